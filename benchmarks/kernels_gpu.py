"""Chapter 13's Triton kernels on a GPU: dequantization bandwidth against bitsandbytes' CUDA kernels and the
device's peak, and the fused 4-bit matmul against dequantize-then-`F.linear`.

    python benchmarks/kernels_gpu.py                       # print the tables (needs CUDA)
    python benchmarks/kernels_gpu.py --write               # also write benchmarks/results/kernels_gpu.md
    python benchmarks/kernels_gpu.py --interpreter         # CPU: the same kernels in Triton's interpreter
    python benchmarks/kernels_gpu.py --interpreter --write # ... and write benchmarks/results/kernels_interpreter.md

Without CUDA (and without --interpreter) it prints why it skips and exits 0, writing nothing, so `make bench`
passes on a laptop and keeps any GPU results committed earlier.

What is measured (CUDA):
- Dequantization of NF4 with and without double quantization to bf16, and of row-wise int8 to bf16 and fp32:
  effective bandwidth = bytes read + bytes written per second, the fraction of the device's peak
  (`--peak-tbps`, 4.8 TB/s for an H200), and parameters per second. The NF4 rows run bitsandbytes'
  `dequantize_4bit` (its CUDA kernels) on the same bytes and check that both outputs are `torch.equal`.
- The fused `matmul_4bit` (weight never written in bf16) against bitsandbytes' dequantize followed by
  `F.linear`, and against `bitsandbytes.matmul_4bit` (its GEMV kernel for one row), for batch sizes 1, 16, 256.
- Sizes 1024x1024 up to 8192x8192 and the 28672x8192 MLP weight of a 70B Llama layer.
- Block sizes: each kernel is timed with a few candidate block sizes / warps (a small autotune); the table
  shows the best and the launcher's default, so the defaults in minillm/quant/kernels can be set from it.

Times are medians of `triton.testing.do_bench`, which clears the L2 cache before every run, so each run reads
from HBM.
"""

import os
import sys

if "--interpreter" in sys.argv:  # both are read once, at import: set them before torch and triton load
    os.environ["OMP_NUM_THREADS"] = "1"  # bitsandbytes' C kernels use OpenMP; one thread, like torch below
    os.environ["TRITON_INTERPRET"] = "1"  # before minillm.quant.kernels defines the kernels

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = [(1024, 1024), (4096, 4096), (8192, 8192), (28672, 8192)]  # (out_features, in_features)
SHAPE_NAMES = {(28672, 8192): "28672x8192 (70B MLP)"}
BATCHES = [1, 16, 256]
PEAKS_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}  # HBM peaks, datasheet values (SXM parts)

# Candidates for the small autotune: (bytes per program, warps); (rows, columns, warps); matmul tiles.
DEQUANT_4BIT_CONFIGS = [(b, w) for b in (512, 1024, 2048, 4096) for w in (4, 8)]
DEQUANT_INT8_CONFIGS = [(8, 1024, 4), (16, 1024, 8), (4, 2048, 8), (32, 512, 8), (16, 512, 4)]
MATMUL_CONFIGS = [(16, 64, 64, 4, 3), (16, 32, 128, 4, 4), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3),
                  (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3)]  # (M, N, K tiles, warps, stages)


def label(shape) -> str:
    return SHAPE_NAMES.get(tuple(shape), f"{shape[0]}x{shape[1]}")


@dataclass
class Timed:
    what: str
    shape: str
    ms: float
    bytes_moved: float
    params: float
    note: str = ""

    def tbps(self) -> float:
        return self.bytes_moved / (self.ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------------- CUDA
def bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def autotune(fn: Callable[[], object], configs, apply: Callable[[object], None], default) -> tuple:
    """Time fn under each config (apply sets the launcher's module constants); restore the default.

    Returns (best config, its ms, the default config's ms).
    """
    times = {}
    for config in configs + ([default] if default not in configs else []):
        apply(config)
        try:
            fn()  # compile outside the timing
            times[config] = bench_ms(fn)
        except Exception as error:  # a config that does not fit (registers, shared memory) is skipped
            print(f"    config {config} failed: {type(error).__name__}: {str(error)[:200]}")
    apply(default)
    best = min(times, key=times.get)
    return best, times[best], times[default]


def to_minillm_state(state):
    """bitsandbytes' QuantState -> minillm's, sharing the tensors (same layout, see chapter 12)."""
    from minillm.quant.nf4 import QuantState

    nested = dict(offset=state.offset, nested_absmax=state.state2.absmax, nested_code=state.state2.code,
                  nested_blocksize=state.state2.blocksize) if state.nested else {}
    return QuantState(absmax=state.absmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
                      quant_type=state.quant_type, code=state.code, **nested)


def relative_rms(y: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of (y - expected) over RMS of expected; expected is a float64 product."""
    return ((y.double() - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run_cuda(args) -> str:
    import bitsandbytes
    import bitsandbytes.functional as bnb_F
    import torch.nn.functional as F
    import triton

    from minillm.quant import kernels
    from minillm.quant.kernels import dequant, matmul

    assert not kernels.INTERPRETED, "unset TRITON_INTERPRET to benchmark the compiled kernels"
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tbps or next((p for key, p in PEAKS_TBPS.items() if key in name), 4.8)
    print(f"{name}: peak {peak} TB/s; triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}")
    rows, tuned = [], []
    g = torch.Generator(device="cuda").manual_seed(0)

    def set_4bit(c):
        dequant.BLOCK_4BIT, dequant.NUM_WARPS = c

    def set_int8(c):
        dequant.BLOCK_INT8, dequant.NUM_WARPS = c[:2], c[2]

    for shape in SHAPES:
        n = shape[0] * shape[1]
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
        for nested in (False, True):
            packed, bnb_state = bnb_F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
            state = to_minillm_state(bnb_state)
            ours = kernels.dequantize_4bit(packed, state)
            equal = torch.equal(ours, bnb_F.dequantize_4bit(packed, bnb_state))
            moved = nbytes(packed, state.absmax, state.nested_absmax, state.offset) + n * 2
            what = f"NF4{' + DQ' if nested else ''} -> bf16"
            default = (dequant.BLOCK_4BIT, dequant.NUM_WARPS)
            best, best_ms, default_ms = autotune(lambda: kernels.dequantize_4bit(packed, state),
                                                 DEQUANT_4BIT_CONFIGS, set_4bit, default)
            bnb_ms = bench_ms(lambda: bnb_F.dequantize_4bit(packed, bnb_state))
            rows += [Timed(f"{what}, minillm (best {best})", label(shape), best_ms, moved, n,
                           "equal to bnb" if equal else "DIFFERS from bnb"),
                     Timed(f"{what}, minillm (default)", label(shape), default_ms, moved, n),
                     Timed(f"{what}, bitsandbytes", label(shape), bnb_ms, moved, n)]
            tuned.append((f"dequantize_4bit {what} {label(shape)}", best))
            del ours

        q, absmax, _ = bnb_F.int8_vectorwise_quant(weight.half())
        step = absmax * (1 / 127)
        for out_dtype in (torch.bfloat16, torch.float32):
            moved = nbytes(q, step) + n * torch.empty(0, dtype=out_dtype).element_size()
            what = f"int8 -> {str(out_dtype).removeprefix('torch.')}"
            default = (*dequant.BLOCK_INT8, dequant.NUM_WARPS)
            best, best_ms, default_ms = autotune(lambda: kernels.dequantize_int8(q, step, out_dtype),
                                                 DEQUANT_INT8_CONFIGS, set_int8, default)
            reference = ("bitsandbytes int8_vectorwise_dequant", lambda: bnb_F.int8_vectorwise_dequant(q, absmax)) \
                if out_dtype == torch.float32 else ("torch eager", lambda: (q.float() * step[:, None]).to(out_dtype))
            rows += [Timed(f"{what}, minillm (best {best})", label(shape), best_ms, moved, n),
                     Timed(f"{what}, minillm (default)", label(shape), default_ms, moved, n),
                     Timed(f"{what}, {reference[0]}", label(shape), bench_ms(reference[1]), moved, n)]
            tuned.append((f"dequantize_int8 {what} {label(shape)}", best))
        del q, weight
        torch.cuda.empty_cache()

    mm_rows = []
    default_tiles, default_launch = matmul.tile_sizes, (matmul.NUM_WARPS, matmul.NUM_STAGES)

    def set_tiles(c):
        if c == "default":
            matmul.tile_sizes, (matmul.NUM_WARPS, matmul.NUM_STAGES) = default_tiles, default_launch
        else:
            matmul.tile_sizes = lambda m, n_, k, min_k=16, c=c: c[:3]
            matmul.NUM_WARPS, matmul.NUM_STAGES = c[3:]

    for shape in SHAPES[1:]:
        N, K = shape
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
        packed, bnb_state = bnb_F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        state = to_minillm_state(bnb_state)
        for M in BATCHES:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
            dequantized = bnb_F.dequantize_4bit(packed, bnb_state)  # (N, K) bf16
            expected = F.linear(x.double(), dequantized.double())
            errors = (relative_rms(kernels.matmul_4bit(x, packed, state), expected),
                      relative_rms(F.linear(x, dequantized), expected))
            del dequantized
            configs = [c for c in MATMUL_CONFIGS if c[0] <= max(16, triton.next_power_of_2(M))]
            best, best_ms, default_ms = autotune(lambda: kernels.matmul_4bit(x, packed, state), configs, set_tiles,
                                                 "default")
            moved = nbytes(packed, state.absmax, state.nested_absmax, x) + M * N * 2
            dq_ms = bench_ms(lambda: F.linear(x, bnb_F.dequantize_4bit(packed, bnb_state)))
            bnb_ms = bench_ms(lambda: bitsandbytes.matmul_4bit(x, packed.t(), quant_state=bnb_state))
            mm_rows.append((label(shape), M, best, best_ms, default_ms, dq_ms, bnb_ms, moved, *errors))
            tuned.append((f"matmul_4bit {label(shape)} M={M}", best))
        del weight, packed
        torch.cuda.empty_cache()

    return report_cuda(name, peak, rows, mm_rows, tuned, bitsandbytes.__version__, triton.__version__)


def report_cuda(name, peak, rows, mm_rows, tuned, bnb_version, triton_version) -> str:
    lines = [f"# minillm.quant.kernels on {name}\n",
             f"Peak bandwidth taken as {peak} TB/s (datasheet). Median of `triton.testing.do_bench` (L2 cleared "
             "before every run). bytes = bytes read + bytes written once each; dequantization to bf16 of NF4 "
             "with double quantization moves 2.516 bytes per parameter (0.5 packed + 1/64 absmax codes + "
             "2 written).\n",
             "## Dequantization\n",
             "| kernel | weight | ms | TB/s | % of peak | G params/s | note |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.shape} | {r.ms:.4f} | {r.tbps():.2f} | {100 * r.tbps() / peak:.0f} % "
              f"| {r.params / r.ms / 1e6:.0f} | {r.note} |" for r in rows]
    lines += ["\n## Fused NF4 (+ double quant) matmul, bf16: `x (M, K) @ W.T`\n",
              "| weight (N x K) | M | tiles (M, N, K, warps, stages) | minillm fused ms | minillm default ms "
              "| dequantize + F.linear ms | bitsandbytes.matmul_4bit ms | fused TB/s "
              "| speed-up vs dequantize + F.linear | rel. RMS error fused / F.linear |", "|---" * 10 + "|"]
    lines += [f"| {s} | {M} | {best} | {b:.4f} | {d:.4f} | {dq:.4f} | {bnb:.4f} | {moved / (b * 1e-3) / 1e12:.2f} "
              f"| {dq / b:.2f}x | {e_ours:.2e} / {e_torch:.2e} |"
              for s, M, best, b, d, dq, bnb, moved, e_ours, e_torch in mm_rows]
    lines += ["\n## Best block sizes found\n", "| kernel and size | best config |", "|---|---|"]
    lines += [f"| {what} | {best} |" for what, best in tuned]
    lines += [f"\nMachine: {name}, torch {torch.__version__}, triton {triton_version}, bitsandbytes {bnb_version}, "
              f"Python {platform.python_version()}.\n"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- interpreter
def run_interpreter(args) -> str:
    """Time each kernel in Triton's interpreter on a 1024x1024 weight, next to the pure-torch versions."""
    import bitsandbytes.functional as bnb_F

    from minillm.quant import kernels
    from minillm.quant.int8 import absmax_quantize
    from minillm.quant.nf4 import dequantize_4bit, quantize_4bit

    assert kernels.INTERPRETED
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 1024, generator=g)
    x = torch.randn(16, 1024, generator=g)
    packed, state = quantize_4bit(weight, 64, "nf4", True)
    bnb_packed, bnb_state = bnb_F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    q, step = absmax_quantize(weight, dim=-1)
    x_q, x_step = absmax_quantize(x, dim=-1)
    tasks = [
        ("dequantize_4bit NF4 + DQ -> bf16, 1024x1024", lambda: kernels.dequantize_4bit(packed, state, torch.bfloat16),
         lambda: dequantize_4bit(packed, state, torch.bfloat16), "minillm.quant (torch)"),
        ("dequantize_4bit NF4 + DQ -> fp32, 1024x1024", lambda: kernels.dequantize_4bit(packed, state),
         lambda: bnb_F.dequantize_4bit(bnb_packed, bnb_state), "bitsandbytes CPU (C)"),
        ("dequantize_int8 -> bf16, 1024x1024", lambda: kernels.dequantize_int8(q, step, torch.bfloat16),
         lambda: (q.float() * step).to(torch.bfloat16), "torch"),
        ("matmul_4bit x (16, 1024) fp32 @ W.T", lambda: kernels.matmul_4bit(x, packed, state),
         lambda: torch.nn.functional.linear(x, dequantize_4bit(packed, state)), "dequantize + F.linear (torch)"),
        ("matmul_int8 (16, 1024) @ (1024, 1024).T", lambda: kernels.matmul_int8(x_q, x_step, q, step),
         lambda: (x_q.int() @ q.int().T).float() * x_step * step.T, "torch int32 matmul"),
    ]
    results = []
    for what, ours, theirs, theirs_name in tasks:
        ours(), theirs()  # warm-up
        t_ours = statistics.median(seconds(ours) for _ in range(args.reps))
        t_theirs = statistics.median(seconds(theirs) for _ in range(args.reps))
        results.append((what, t_ours, theirs_name, t_theirs))
        print(f"{what:>45}: interpreter {1e3 * t_ours:8.1f} ms   {theirs_name} {1e3 * t_theirs:7.1f} ms")
    blocks = (f"BLOCK_4BIT={kernels.dequant.BLOCK_4BIT} bytes, BLOCK_INT8={kernels.dequant.BLOCK_INT8}, "
              f"matmul tiles {kernels.matmul.tile_sizes(16, 1024, 1024)}")
    return ("# minillm.quant.kernels in Triton's interpreter (CPU)\n\n"
            f"One thread (torch and OpenMP), median of {args.reps} runs after a warm-up; the launchers' interpreter block sizes "
            f"({blocks}). The interpreter runs each program instance as numpy calls, about 1-2 ms per program "
            "plus the work, so large blocks (few programs) keep it fast; it is for checking, not speed.\n\n"
            "| kernel | interpreter ms | reference | reference ms |\n|---|---|---|---|\n"
            + "".join(f"| {w} | {1e3 * a:.1f} | {n} | {1e3 * b:.1f} |\n" for w, a, n, b in results)
            + f"\nMachine: {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}.\n")


def seconds(task) -> float:
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write a markdown table under {RESULTS}")
    parser.add_argument("--interpreter", action="store_true", help="time the kernels in Triton's CPU interpreter")
    parser.add_argument("--peak-tbps", type=float, default=None, help="the GPU's peak bandwidth (default: by name)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per kernel in --interpreter mode")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its import warns about an optional package

    if args.interpreter:
        report, path = run_interpreter(args), RESULTS / "kernels_interpreter.md"
    elif not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device, skipped (nothing written). Run it on a GPU, or pass --interpreter "
              "to time the kernels in Triton's CPU interpreter.")
        return 0
    else:
        report, path = run_cuda(args), RESULTS / "kernels_gpu.md"
        print(report)
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
