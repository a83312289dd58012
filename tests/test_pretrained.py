"""The shipped tiny GPT (minillm/assets/tiny_gpt): it loads fast, reproduces its recorded losses, writes like the
corpus, and scripts/make_checkpoint.py makes it deterministically."""

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

from minillm import data
from minillm.pretrained import PRETRAINED_DIR, load_pretrained, pretrained_metrics
from minillm.train import ENDOFTEXT, bigram_loss, eval_windows, evaluate, sample, story_tokens, unigram_loss

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "regenerate it with `python scripts/make_checkpoint.py`"


def load_script():
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "scripts" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained()


def test_the_artifact_is_small_and_complete():
    names = {"config.json", "model.safetensors", "tokenizer.json", "metrics.json"}
    assert names <= {p.name for p in PRETRAINED_DIR.iterdir()}, f"missing files in {PRETRAINED_DIR}; {REGENERATE}"
    size = sum((PRETRAINED_DIR / name).stat().st_size for name in names)
    assert size < 8 * 2**20, f"the shipped model takes {size / 2**20:.1f} MiB; keep it to a few MB"


def test_loading_takes_well_under_a_second(pretrained):
    start = time.perf_counter()
    model, tokenizer = load_pretrained()
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"load_pretrained took {seconds:.2f} s; later chapters load it in every notebook"
    assert not model.training, "load_pretrained must return the model in eval mode"
    assert tokenizer.vocab_size == model.config.vocab_size and ENDOFTEXT in tokenizer.special_tokens


def test_it_reproduces_its_recorded_validation_loss_and_baselines(pretrained):
    model, tokenizer = pretrained
    metrics = pretrained_metrics()
    block_size, windows = metrics["eval"]["block_size"], metrics["eval"]["windows"]
    val_tokens, train_tokens = story_tokens(tokenizer, "val"), story_tokens(tokenizer, "train")
    assert windows == (len(val_tokens) - 1) // block_size, "metrics.json must describe the whole val split"
    inputs, targets = eval_windows(val_tokens, block_size, windows)
    assert metrics["eval"]["predicted_tokens"] == targets.numel()
    V = model.config.vocab_size
    assert evaluate(model, val_tokens, block_size) == pytest.approx(metrics["val_loss"], abs=1e-4), (
        f"the shipped weights no longer give the recorded val loss; {REGENERATE}")
    assert unigram_loss(train_tokens, targets, V) == pytest.approx(metrics["unigram_loss"], abs=1e-9)
    assert bigram_loss(train_tokens, inputs, targets, V) == pytest.approx(metrics["bigram_loss"], abs=1e-9)
    assert metrics["val_loss"] < metrics["bigram_loss"] - 0.5 < metrics["unigram_loss"], (
        f"the model should beat the bigram baseline by a wide margin: {metrics}")


def test_samples_read_like_the_corpus(pretrained):
    model, tokenizer = pretrained
    corpus_words = set(re.findall(r"[A-Za-z]+", data.corpus("train") + data.corpus("val")))
    generator = torch.Generator().manual_seed(0)
    text = " ".join(sample(model, tokenizer, ENDOFTEXT, 60, temperature=0.8, generator=generator) for _ in range(3))
    words = re.findall(r"[A-Za-z]+", text)
    known = sum(word in corpus_words for word in words)
    assert len(words) >= 60 and known / len(words) >= 0.9, (
        f"only {known}/{len(words)} sampled words are corpus words; the model is undertrained:\n{text}")


def test_make_checkpoint_is_deterministic(tmp_path):
    script = load_script()
    first = script.main(tmp_path / "a", steps=2, show_progress=False)
    second = script.main(tmp_path / "b", steps=2, show_progress=False)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), (
            f"two runs of make_checkpoint.main wrote different {name}")
    assert first["val_loss"] == second["val_loss"]
    # The shipped folder was made by the same script: same config and tokenizer, whatever the step count.
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (PRETRAINED_DIR / name).read_bytes(), (
            f"the shipped {name} differs from what make_checkpoint.py writes; {REGENERATE}")


def test_a_missing_model_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_checkpoint.py"):
        load_pretrained(tmp_path)
