"""Chapter 15's training comparison (8-bit AdamW against fp32 AdamW) over several seeds, written to
minillm/assets/optim8bit_seeds.json.

    python scripts/optim8bit_seeds.py               # seeds 0, 1, 2: a few minutes on one thread
    python scripts/optim8bit_seeds.py --seeds 0 1 2 3 4

Two experiments, the chapter's (the constants below are its): the shipped model's architecture trained from a
fresh init for 60 steps, and the shipped model continued for 20 steps at a small learning rate. A seed sets the
fresh init and the order of the training batches; for each seed both optimizers see the same init and the same
batches, so their difference is the optimizer's alone. Recorded per run: the training loss of every step and
the final validation loss. One thread, as the notebooks run.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minillm.models import GPT  # noqa: E402
from minillm.pretrained import load_pretrained  # noqa: E402
from minillm.quant.optim import AdamW8bit  # noqa: E402
from minillm.train import TrainConfig, story_tokens, train  # noqa: E402

RESULTS = ROOT / "minillm" / "assets" / "optim8bit_seeds.json"
OPTIMIZERS = {"fp32 AdamW": torch.optim.AdamW, "8-bit AdamW": AdamW8bit}
# experiment -> (steps, max_lr, min_lr, warmup); chapter 15's section 6
EXPERIMENTS = {"from scratch": (60, 5e-3, 5e-4, 15), "shipped model": (20, 3e-4, 3e-5, 2)}


def run(experiment: str, optimizer_class, seed: int, train_tokens, val_tokens) -> dict:
    """One training run: the training loss of each step and the final validation loss."""
    steps, max_lr, min_lr, warmup = EXPERIMENTS[experiment]
    shipped = load_pretrained()[0]
    if experiment == "from scratch":
        torch.manual_seed(seed)
        model = GPT(shipped.config)  # same architecture, fresh weights
    else:
        model = shipped
    config = TrainConfig(steps=steps, batch_size=8, block_size=64, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup,
                         weight_decay=0.01, eval_every=steps, seed=seed, show_progress=False)
    history = train(model, train_tokens, val_tokens, config, optimizer_class=optimizer_class)
    return {"train_loss": history["train_loss"], "val_loss": history["val_loss"][-1]}


def summary(runs: list[dict]) -> dict:
    """Mean and sample standard deviation over seeds of the final validation loss and of the 8-bit - fp32 gap."""
    table = {}
    for experiment in EXPERIMENTS:
        rows = [r for r in runs if r["experiment"] == experiment]
        final = {name: [r["val_loss"] for r in rows if r["optimizer"] == name] for name in OPTIMIZERS}
        gaps = [b - a for a, b in zip(final["fp32 AdamW"], final["8-bit AdamW"])]  # same seed, paired
        table[experiment] = {name: {"mean": statistics.mean(v), "sd": statistics.stdev(v)} for name, v in final.items()}
        table[experiment]["gap (8-bit - fp32)"] = {"mean": statistics.mean(gaps), "sd": statistics.stdev(gaps)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("a standard deviation needs at least two seeds")
    torch.set_num_threads(1)
    _, tokenizer = load_pretrained()
    train_tokens, val_tokens = story_tokens(tokenizer, "train"), story_tokens(tokenizer, "val")
    runs, started = [], time.perf_counter()
    for seed in args.seeds:
        for experiment in EXPERIMENTS:
            for name, optimizer_class in OPTIMIZERS.items():
                result = run(experiment, optimizer_class, seed, train_tokens, val_tokens)
                runs.append({"experiment": experiment, "optimizer": name, "seed": seed, **result})
                print(f"seed {seed}, {experiment}, {name}: val loss {result['val_loss']:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    RESULTS.write_text(json.dumps({"seeds": args.seeds, "experiments": {k: dict(zip(("steps", "max_lr", "min_lr",
                       "warmup"), v)) for k, v in EXPERIMENTS.items()}, "summary": summary(runs), "runs": runs},
                       indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
