"""Chapters 09 and 10's fine-tuning table over several seeds, written to minillm/assets/finetune_seeds.json.

    python scripts/finetune_seeds.py               # seeds 0, 1, 2: about 5 minutes on one thread
    python scripts/finetune_seeds.py --seeds 0 1 2 3 4

Each notebook trains its methods once (seed 0), within its minute; whether one method beats another cannot be
read from one seed. This script reruns the same configurations (the constants below are the notebooks') with
other seeds and records, on the held-out pairs, three numbers per run:

- exact match: the share of answers greedy decoding writes exactly (`finetune.exact_match`);
- answer loss: mean cross-entropy of the answer tokens, nats per token (`finetune.answer_loss`);
- token accuracy: the share of answer tokens that are the argmax, teacher-forced; unlike exact match it moves
  before whole answers come right, so it tells the 0 % rows of chapter 10 apart.

A seed sets the adapter's random init (LoRA's A, the prefix table, the soft prompt's vocabulary rows) and the
order of the training batches. One thread, as the notebooks run: seed 0 reproduces their rows, except prompt
tuning, whose soft prompt chapter 10 draws after the prefix table from the same seed.
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

from minillm import finetune  # noqa: E402
from minillm.peft import add_lora  # noqa: E402
from minillm.peft.prefix import PrefixTuning  # noqa: E402
from minillm.peft.prompt import PromptTuning  # noqa: E402
from minillm.pretrained import load_pretrained  # noqa: E402

RESULTS = ROOT / "minillm" / "assets" / "finetune_seeds.json"
BATCH = 8
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # chapter 09: every linear layer of every block


def full_model():
    return load_pretrained()[0]


def lora_model(r: int):
    return add_lora(load_pretrained()[0], r=r, alpha=2 * r, target_modules=LORA_TARGETS)


# method -> (chapter, steps, lr, builder); the values of chapters 09 and 10's training cells.
METHODS = {
    "full fine-tuning": ("09", 80, 0.001, full_model),
    "LoRA r=2": ("09", 80, 0.01, lambda: lora_model(2)),
    "LoRA r=4": ("09", 80, 0.01, lambda: lora_model(4)),
    "prefix tuning P=10": ("10", 100, 0.1, lambda: PrefixTuning(load_pretrained()[0], 10)),
    "prompt tuning P=10": ("10", 100, 0.03, lambda: PromptTuning(load_pretrained()[0], 10, init="vocab")),
}


@torch.no_grad()
def answer_metrics(model, tokenizer, pairs) -> tuple[float, float]:
    """(mean nats per answer token, share of answer tokens that are the argmax), teacher-forced."""
    model.eval()
    inputs, targets = finetune.make_batch(tokenizer, pairs)  # (B, T), (B, T)
    loss = finetune.answer_loss(model, inputs, targets).item()
    scored = targets != finetune.IGNORE_INDEX  # (B, T)
    right = (model(inputs).argmax(dim=-1) == targets) & scored
    return loss, (right.sum() / scored.sum()).item()


def one_run(method: str, seed: int, tokenizer, val_pairs) -> dict:
    chapter, steps, lr, build = METHODS[method]
    torch.manual_seed(seed)  # the adapter's random init
    model = build()
    result = finetune.run(method, model, tokenizer, steps=steps, lr=lr, batch_size=BATCH, seed=seed,
                          show_progress=False)
    loss, token_accuracy = answer_metrics(model, tokenizer, val_pairs)
    return {"exact_match": result.accuracy, "answer_loss": loss, "token_accuracy": token_accuracy}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(seeds: list[int]) -> None:
    if len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs at least 3 different seeds, got {seeds}")
    torch.set_num_threads(1)
    _, tokenizer = load_pretrained()
    val_pairs = finetune.task_pairs("val")
    report = {"seeds": seeds, "batch_size": BATCH, "val_pairs": len(val_pairs),
              "command": "python scripts/finetune_seeds.py --seeds " + " ".join(map(str, seeds)),
              "torch": torch.__version__, "methods": {}}
    for method, (chapter, steps, lr, _) in METHODS.items():
        started = time.time()
        runs = [one_run(method, seed, tokenizer, val_pairs) for seed in seeds]
        metrics = {key: [run[key] for run in runs] for key in runs[0]}
        report["methods"][method] = {"chapter": chapter, "steps": steps, "lr": lr, "per_seed": metrics,
                                     **{key: summary(values) for key, values in metrics.items()}}
        print(f"{method:<20} exact match {metrics['exact_match']}  answer loss "
              f"{[round(v, 3) for v in metrics['answer_loss']]}  token accuracy "
              f"{[round(v, 3) for v in metrics['token_accuracy']]}  ({time.time() - started:.0f} s)", flush=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    main(parser.parse_args().seeds)
