"""Real checkpoints through the learner's code path (minillm.hub), offline: tiny GPT-2 and Llama checkpoints
written here by transformers' save_pretrained and tokenizers' own classes, a Hugging Face cache laid out in a
temporary folder, and the messages a learner sees when a checkpoint is missing or the Hub is unreachable."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from minillm import hub
from minillm.hub import real_text
from checkpoint_helpers import write_checkpoint, write_tokenizer
from minillm.models import GPT, Llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_checkpoint(folder, request.param)
    return request.param, folder


def test_logits_and_token_ids_equal_transformers(checkpoint):
    kind, folder = checkpoint
    model, tokenizer = hub.load_hf(folder)
    assert isinstance(model, GPT if kind == "gpt2" else Llama) and not model.training
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = real_text()[:3000]
    ids = tokenizer.encode(text)
    assert ids == reference_tokenizer(text)["input_ids"], "token ids differ from the checkpoint's HF tokenizer"
    assert tokenizer.decode(ids) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    batch = torch.tensor([ids[:48]])
    with torch.no_grad():
        # Same weights, same torch ops in the same order (chapter 06): equal on every CPU.
        assert torch.equal(model(batch), hf(batch).logits)


def test_bfloat16_halves_the_weights(checkpoint):
    _, folder = checkpoint
    model, _ = hub.load_hf(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_the_hugging_face_cache_layout(tmp_path):
    """snapshot folders and refs/main as huggingface_hub writes them; load by repository id, offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--course--tiny-gpt2"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    write_checkpoint(snapshot, "gpt2")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, tokenizer = hub.load_hf("course/tiny-gpt2", cache_dir=tmp_path)
    assert isinstance(model, GPT) and tokenizer.vocab_size == 400


def test_a_missing_checkpoint_says_how_to_get_it(tmp_path, capsys):
    with pytest.raises(hub.CheckpointNotFound, match=r"python -m minillm download nobody/not-here"):
        hub.load_hf("nobody/not-here", cache_dir=tmp_path)
    with pytest.raises(hub.CheckpointNotFound, match="holds no config.json"):
        hub.load_hf(tmp_path)
    assert hub.real_model("nobody/not-here") is None
    assert capsys.readouterr().out == ("nobody/not-here is not on this machine, so this section is skipped: run "
                                       "`python -m minillm download nobody/not-here` once while online.\n")


def test_unsupported_architectures_and_tokenizers_are_named(checkpoint, tmp_path):
    _, folder = checkpoint
    other = tmp_path / "bert"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; minillm loads gpt2 \(GPT2LMHeadModel\)"):
        hub.load_hf(other)
    spm = tmp_path / "sentencepiece"
    shutil.copytree(folder, spm)
    tokenizer = json.loads((spm / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    (spm / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="minillm cannot read this checkpoint's tokenizer: .* byte-level BPE"):
        hub.load_hf(spm)


def test_download_offline_is_a_clear_message():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "minillm", "download", "gpt2"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 1
    assert "cannot be reached from this machine" in done.stderr and "python -m minillm download gpt2" in done.stderr


MEASURE = """
import resource, sys, torch
from minillm import hub
import transformers  # imported before the baseline, as load_hf would
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model, _ = hub.load_hf(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_loading_needs_about_twice_the_weights_in_memory(tmp_path):
    """transformers' copy plus ours, no more: measured as the growth of peak RSS in a fresh process."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=400, n_positions=64, n_embd=512, n_layer=8, n_head=8,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path)
    write_tokenizer(tmp_path)
    del model
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grew = int(done.stdout.split()[-1])
    assert grew <= 2.5 * weights, f"loading {weights / 2**20:.0f} MiB of weights raised peak memory by {grew / 2**20:.0f} MiB"
