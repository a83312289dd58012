"""minillm.quant against bitsandbytes' CPU backend: quantize/dequantize throughput on a 4096x4096 weight, one thread.

Chapters 11-12 write quantization in plain torch; bitsandbytes' CPU backend runs C loops (OpenMP) for the
blockwise formats and torch for LLM.int8()'s vector-wise one. This script times both on the same 4096x4096
weight (16.8 M values) and prints the ratio of times. Each row first checks that both give equal
(`torch.equal`) results, so the comparison is of the same work.

    python benchmarks/quant_vs_bnb.py            # print the medians and the ratios
    python benchmarks/quant_vs_bnb.py --write    # also write benchmarks/results/quant_vs_bnb.md

The two run interleaved in one process (ours, bitsandbytes', ours, ...), so a machine that gets busier or
quieter during the run affects both alike. One thread: OMP_NUM_THREADS is set before torch and bitsandbytes
load, and torch.set_num_threads(1). To add a format, add one `Row` to the list in `rows()`.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"  # bitsandbytes' C kernels use OpenMP; read when the library loads

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its import warns about an optional package
import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnb_F  # noqa: E402

from minillm.quant import (create_dynamic_map, dequantize_4bit, dequantize_blockwise,  # noqa: E402
                           int8_vectorwise_dequant, int8_vectorwise_quant, quantize_4bit, quantize_blockwise)

SHAPE = (4096, 4096)
RESULTS = Path(__file__).parent / "results" / "quant_vs_bnb.md"


@dataclass
class Row:
    """One timed task: `ours` and `theirs` do the same work and return results that must be equal."""
    name: str
    ours: Callable[[], object]
    theirs: Callable[[], object]


def rows(weight: torch.Tensor) -> list[Row]:
    """The benchmark's tasks on one (4096, 4096) fp32 weight; inputs to dequantize are made here, untimed."""
    code = create_dynamic_map()
    half = weight.half()  # LLM.int8() quantizes fp16 weights (Linear8bitLt casts to fp16 first)
    int8_codes, int8_absmax, _ = int8_vectorwise_quant(half)
    table = []
    for blocksize in (4096, 256):
        codes, absmax = quantize_blockwise(weight, blocksize=blocksize)
        bnb_state = bnb_F.QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
        table += [
            Row(f"quantize_blockwise, blocksize {blocksize}",
                lambda bs=blocksize: quantize_blockwise(weight, blocksize=bs),
                lambda bs=blocksize: bnb_blockwise(weight, bs)),
            Row(f"dequantize_blockwise, blocksize {blocksize}",
                lambda c=codes, a=absmax, bs=blocksize: dequantize_blockwise(c, a, blocksize=bs),
                lambda c=codes, s=bnb_state: bnb_F.dequantize_blockwise(c, s)),
        ]
    table += [
        Row("int8_vectorwise_quant (fp16)", lambda: int8_vectorwise_quant(half)[:2],
            lambda: bnb_F.int8_vectorwise_quant(half)[:2]),
        Row("int8_vectorwise_dequant", lambda: int8_vectorwise_dequant(int8_codes, int8_absmax),
            lambda: bnb_F.int8_vectorwise_dequant(int8_codes, int8_absmax)),
    ]
    for double in (False, True):  # NF4, then NF4 with double-quantized absmax (QLoRA's storage format)
        packed, state = quantize_4bit(weight, 64, "nf4", double)
        bnb_packed, bnb_state = bnb_F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double)
        label = f"nf4{' + double quant' if double else ''}, blocksize 64"
        table += [
            Row(f"quantize_4bit, {label}",
                lambda d=double: ours_4bit(*quantize_4bit(weight, 64, "nf4", d)),
                lambda d=double: bnb_4bit(*bnb_F.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                                               compress_statistics=d))),
            Row(f"dequantize_4bit, {label}", lambda p=packed, s=state: dequantize_4bit(p, s),
                lambda p=bnb_packed, s=bnb_state: bnb_F.dequantize_4bit(p, s)),
        ]
    return table


def bnb_blockwise(x: torch.Tensor, blocksize: int):
    codes, state = bnb_F.quantize_blockwise(x, blocksize=blocksize)
    return codes, state.absmax


def ours_4bit(packed, state):
    return (packed, state.absmax) + ((state.offset, state.nested_absmax) if state.nested else ())


def bnb_4bit(packed, state):
    return (packed, state.absmax) + ((state.offset, state.state2.absmax) if state.nested else ())


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))


def seconds(task) -> float:
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed runs of each, alternating")
    parser.add_argument("--write", action="store_true", help=f"write a markdown table to {RESULTS}")
    args = parser.parse_args()
    torch.set_num_threads(1)

    weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    table = rows(weight)
    for row in table:
        if not equal(row.ours(), row.theirs()):  # also a warm-up run of each
            raise RuntimeError(f"{row.name}: minillm and bitsandbytes differ; run tests/quant first")

    times = {row.name: {"minillm": [], "bitsandbytes": []} for row in table}
    for _ in range(args.reps):
        for row in table:
            times[row.name]["minillm"].append(seconds(row.ours))
            times[row.name]["bitsandbytes"].append(seconds(row.theirs))

    values = weight.numel()
    results = []
    for name, by_library in times.items():
        ours_s, bnb_s = (statistics.median(by_library[library]) for library in ("minillm", "bitsandbytes"))
        results.append((name, ours_s, bnb_s, ours_s / bnb_s))
        print(f"{name:>38}: minillm {1e3 * ours_s:7.1f} ms ({values / ours_s / 1e6:6.0f} M/s)   "
              f"bitsandbytes {1e3 * bnb_s:7.1f} ms ({values / bnb_s / 1e6:6.0f} M/s)   ratio {ours_s / bnb_s:5.2f}x")
    print(f"weight {SHAPE[0]}x{SHAPE[1]} fp32 ({values / 1e6:.1f} M values), one thread, median of {args.reps}")

    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# minillm.quant vs bitsandbytes (CPU backend): quantize/dequantize throughput\n\n"
            f"Weight: {SHAPE[0]}x{SHAPE[1]} standard normal, fp32 ({values / 1e6:.1f} M values); LLM.int8() rows "
            "quantize its fp16 copy, as `Linear8bitLt` does. One thread (OMP_NUM_THREADS=1, "
            f"torch.set_num_threads(1)); median of {args.reps} interleaved runs. Every row's results are "
            "`torch.equal` between the two libraries (checked before timing).\n\n"
            "| task | minillm ms | bitsandbytes ms | minillm M values/s | bitsandbytes M values/s "
            "| ratio minillm / bitsandbytes |\n|---|---|---|---|---|---|\n"
            + "".join(f"| {name} | {1e3 * o:.1f} | {1e3 * b:.1f} | {values / o / 1e6:.0f} | {values / b / 1e6:.0f} "
                      f"| {r:.2f}x |\n" for name, o, b, r in results)
            + "\nbitsandbytes' blockwise rows run its C kernels (OpenMP); its int8 rows are plain torch, like ours. "
            "Our blockwise functions are several torch passes over the tensor (scale, clamp, grid index, table "
            "lookup; gather, scale, cast), where each C kernel makes one.\n\n"
            f"Machine: {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}.\n"
        )
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
