"""One MLP training step, minillm.engine against torch, on one CPU thread.

Chapter 03's engine is numpy underneath, so its matmuls are as fast as torch's; what it adds is Python
overhead per op and the extra copies of a graph built from numpy arrays. This script measures that cost:
batch 256, MLP 784 -> 512 -> 512 -> 10 with ReLU, cross-entropy, one SGD step, float32.

    python benchmarks/engine_vs_torch.py            # print the medians and the ratio
    python benchmarks/engine_vs_torch.py --write    # also write benchmarks/results/engine_vs_torch.md

Both run interleaved in one process (engine step, torch step, engine step, ...) so a machine that gets
busier or quieter during the run affects both alike.
"""

import os

# One BLAS thread for numpy, the same single thread torch gets below. These must be set before numpy
# is imported: the BLAS library reads them once, when it loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from minillm.engine import Tensor, functional, nn, optim  # noqa: E402

BATCH = 256
SIZES = [784, 512, 512, 10]
LR = 0.01
RESULTS = Path(__file__).parent / "results" / "engine_vs_torch.md"


def make_torch_step(x: np.ndarray, y: np.ndarray):
    torch.manual_seed(0)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(fan_in, fan_out))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        opt.step()
        return loss.item()

    return step, model.state_dict()


def make_engine_step(x: np.ndarray, y: np.ndarray, state_dict):
    model = nn.MLP(SIZES)
    model.load_state_dict(state_dict)  # torch's initial weights: both time exactly the same arithmetic
    opt = optim.SGD(model.parameters(), lr=LR)
    inputs, targets = Tensor(x), Tensor(y)

    def step() -> float:
        opt.zero_grad()
        loss = functional.cross_entropy(model(inputs), targets)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed steps of each, alternating")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each first")
    parser.add_argument("--write", action="store_true", help=f"write a markdown table to {RESULTS}")
    args = parser.parse_args()

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    torch_step, torch_weights = make_torch_step(x, y)
    steps = {"minillm.engine": make_engine_step(x, y, torch_weights), "torch": torch_step}

    for _ in range(args.warmup):
        losses = {name: step() for name, step in steps.items()}
        if abs(losses["minillm.engine"] - losses["torch"]) > 1e-4:
            raise RuntimeError(f"the two training steps disagree (losses {losses}): the benchmark would "
                               "compare different work; run tests/engine/ first")
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            times[name].append(seconds(step))

    median_ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ratio = median_ms["minillm.engine"] / median_ms["torch"]
    for name, ms in median_ms.items():
        print(f"{name:>15}: {ms:7.2f} ms per step (median of {args.reps})")
    print(f"{'ratio':>15}: {ratio:7.2f}x  (minillm.engine / torch, target <= 1.5x)")

    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# minillm.engine vs torch: one MLP training step\n\n"
            f"Batch {BATCH}, MLP {' -> '.join(map(str, SIZES))} with ReLU, cross-entropy, SGD step, float32, "
            f"one thread; median of {args.reps} interleaved steps after {args.warmup} warm-up steps.\n\n"
            "| implementation | median ms / step |\n|---|---|\n"
            + "".join(f"| {name} | {ms:.2f} |\n" for name, ms in median_ms.items())
            + f"| **ratio minillm / torch** | **{ratio:.2f}x** |\n\n"
            f"Machine: {platform.machine()}, Python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__}.\n"
        )
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
