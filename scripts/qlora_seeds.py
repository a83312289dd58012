"""Chapter 14's LoRA vs QLoRA comparison over several seeds, written to minillm/assets/qlora_seeds.json.

    python scripts/qlora_seeds.py                  # seeds 0, 1, 2: about 2 minutes on one thread
    python scripts/qlora_seeds.py --seeds 0 1 2 3 4

Chapter 14 trains each method once (seed 0) within its minute, and with one seed the order of the two
exact-match scores flipped between seeds. This script reruns both with chapter 09's settings for its rank-4
row (alpha 8, adapters on every linear layer, 80 steps of 8 pairs at learning rate 0.01) and records the same
three held-out numbers as scripts/finetune_seeds.py (exact match, answer loss, token accuracy; its
`answer_metrics` computes the last two). A seed sets LoRA's random A and the order of the training batches;
seed 0 reproduces the notebook's rows. The only difference between the two methods is the NF4 base (with
double quantization) of QLoRA.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune_seeds import answer_metrics, summary  # noqa: E402  (scripts/ is on the path: this file's folder)
from minillm import finetune  # noqa: E402
from minillm.peft import add_lora  # noqa: E402
from minillm.peft.qlora import qlora  # noqa: E402
from minillm.pretrained import load_pretrained  # noqa: E402

RESULTS = ROOT / "minillm" / "assets" / "qlora_seeds.json"
STEPS, LR, BATCH, R, ALPHA = 80, 0.01, 8, 4, 8  # chapter 09's LoRA r=4 row, as chapter 14 trains it
TARGETS = ["c_attn", "c_proj", "c_fc"]
METHODS = {
    "LoRA r=4": lambda model: add_lora(model, r=R, alpha=ALPHA, target_modules=TARGETS),
    "QLoRA r=4 (NF4 + DQ)": lambda model: qlora(model, r=R, alpha=ALPHA, target_modules=TARGETS),
}


def one_run(method: str, seed: int, tokenizer, val_pairs) -> dict:
    torch.manual_seed(seed)  # LoRA's random A
    model = METHODS[method](load_pretrained()[0])
    result = finetune.run(method, model, tokenizer, steps=STEPS, lr=LR, batch_size=BATCH, seed=seed,
                          show_progress=False)
    loss, token_accuracy = answer_metrics(model, tokenizer, val_pairs)
    return {"exact_match": result.accuracy, "answer_loss": loss, "token_accuracy": token_accuracy}


def main(seeds: list[int]) -> None:
    if len(seeds) < 3 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs at least 3 different seeds, got {seeds}")
    torch.set_num_threads(1)  # as the notebooks run (minillm.notebook.setup)
    _, tokenizer = load_pretrained()
    val_pairs = finetune.task_pairs("val")
    report = {"seeds": seeds, "steps": STEPS, "lr": LR, "batch_size": BATCH, "r": R, "alpha": ALPHA,
              "val_pairs": len(val_pairs), "torch": torch.__version__,
              "command": "python scripts/qlora_seeds.py --seeds " + " ".join(map(str, seeds)), "methods": {}}
    for method in METHODS:
        started = time.time()
        per_seed = [one_run(method, seed, tokenizer, val_pairs) for seed in seeds]  # one dict of metrics per seed
        columns = {key: [run[key] for run in per_seed] for key in per_seed[0]}  # metric -> one value per seed
        report["methods"][method] = {"steps": STEPS, "lr": LR, "per_seed": columns}
        report["methods"][method].update((key, summary(values)) for key, values in columns.items())
        print(f"{method}: {json.dumps(columns)} in {time.time() - started:.0f} s", flush=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    main(parser.parse_args().seeds)
