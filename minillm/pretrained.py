"""The course's own tiny pretrained GPT, shipped in the package: `model, tokenizer = load_pretrained()`.

scripts/make_checkpoint.py trains it on the story corpus of `minillm.data` (chapter 08 shows how and what it
learned); chapters 09-15 start from it, so none of them trains from scratch. The folder holds config.json and
model.safetensors (chapter 06's `save_pretrained`), tokenizer.json (chapter 04's tokenizer) and metrics.json
(validation loss and the unigram/bigram baselines it was judged against).
"""

import json
from pathlib import Path

from minillm.models import GPT
from minillm.tokenizer import BPETokenizer

PRETRAINED_DIR = Path(__file__).resolve().parent / "assets" / "tiny_gpt"


def load_pretrained(directory=PRETRAINED_DIR) -> tuple[GPT, BPETokenizer]:
    """The shipped model (in eval mode) and its tokenizer; a fraction of a second on a CPU."""
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no pretrained model in {directory}; run `python scripts/make_checkpoint.py`")
    return GPT.from_pretrained(directory), BPETokenizer.load(directory / "tokenizer.json")


def pretrained_metrics(directory=PRETRAINED_DIR) -> dict:
    """metrics.json as written by scripts/make_checkpoint.py: "val_loss", "unigram_loss", "bigram_loss", ..."""
    return json.loads((Path(directory) / "metrics.json").read_text())
