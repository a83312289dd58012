"""Train the course's tiny pretrained GPT and write it to minillm/assets/tiny_gpt/ (chapter 08 shows it).

    python scripts/make_checkpoint.py            # a few minutes on one CPU thread

Chapter 04's tokenizer (1024 tokens, <|endoftext|> between stories) is trained on the train split of
`minillm.data`; a 4-layer GPT (d=128, 4 heads, 256 positions, about 0.96M parameters) is trained on it with
`minillm.train.train`. The folder gets config.json + model.safetensors (save_pretrained), tokenizer.json, and
metrics.json: the validation loss on the whole val split next to a unigram and a bigram baseline, each an
average over exactly the same predicted tokens (see `minillm.train.evaluate`), with the baselines' add-one
(Laplace) smoothed train-split counts. Later chapters load the result with `minillm.pretrained.load_pretrained`.

Deterministic: one thread, `torch.use_deterministic_algorithms(True)` and fixed seeds for the weights and the
batches, so two runs on the same machine write byte-identical model.safetensors (tests/test_pretrained.py
checks it). Only "train_seconds" in metrics.json differs between runs. Another CPU (a different vector
instruction set) may round differently and end with slightly different weights.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minillm.models import GPT, GPTConfig
from minillm.pretrained import PRETRAINED_DIR
from minillm.tokenizer import BPETokenizer
from minillm import data
from minillm.train import (ENDOFTEXT, TrainConfig, bigram_loss, eval_windows, evaluate, story_tokens, train,
                           unigram_loss)

VOCAB_SIZE = 1024
MODEL = GPTConfig(vocab_size=VOCAB_SIZE, max_seq_len=256, hidden_size=128, num_layers=4, num_heads=4)
TRAINING = TrainConfig(steps=600, batch_size=8, block_size=256, max_lr=6e-3, min_lr=6e-4, warmup_steps=30,
                       eval_every=50, eval_windows=8, seed=0)


def main(out_dir: Path = PRETRAINED_DIR, steps: int = TRAINING.steps, seed: int = 0,
         show_progress: bool = True) -> dict:
    """Train from `seed` for `steps` steps, write the four files into `out_dir`, return the metrics."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    tokenizer = BPETokenizer.train([story.text for story in data.split_stories("train")], VOCAB_SIZE,
                                   special_tokens=[ENDOFTEXT])
    train_tokens, val_tokens = story_tokens(tokenizer, "train"), story_tokens(tokenizer, "val")

    torch.manual_seed(seed)
    model = GPT(MODEL)
    config = TrainConfig(**{**vars(TRAINING), "steps": steps, "warmup_steps": min(TRAINING.warmup_steps, steps - 1),
                            "seed": seed, "show_progress": show_progress})
    history = train(model, train_tokens, val_tokens, config)
    seconds = time.perf_counter() - start

    block_size = config.block_size
    n_windows = (len(val_tokens) - 1) // block_size  # the whole val split
    inputs, targets = eval_windows(val_tokens, block_size, n_windows)
    metrics = {
        "val_loss": evaluate(model, val_tokens, block_size),
        "unigram_loss": unigram_loss(train_tokens, targets, VOCAB_SIZE),
        "bigram_loss": bigram_loss(train_tokens, inputs, targets, VOCAB_SIZE),
        "eval": {"split": "val", "block_size": block_size, "windows": n_windows,
                 "predicted_tokens": targets.numel(), "how": "minillm.train.evaluate(model, val_tokens, block_size)"},
        "baselines": "add-one (Laplace) smoothed train-split token counts: unigram (c(t)+1)/(N+V), "
                     "bigram (c(a,b)+1)/(c(a)+V), on the same predicted tokens",
        "train_tokens": len(train_tokens),
        "steps": steps,
        "tokens_seen": steps * config.batch_size * config.block_size * config.grad_accum_steps,
        "num_parameters": model.num_parameters(),
        "seed": seed,
        "final_train_loss": history["train_loss"][-1],
        "train_seconds": round(seconds, 1),
    }
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save(out_dir / "tokenizer.json")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    parser.add_argument("--steps", type=int, default=TRAINING.steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(main(args.out, args.steps, args.seed), indent=2))
    sys.exit(0)
