"""Saves are atomic (issue 15, minillm.files): a save that fails halfway leaves the old files loadable.

A full disk is simulated in a child process with a file-size limit (`RLIMIT_FSIZE`) of half the new weights
file: the write fails in the middle with EFBIG, as it would with ENOSPC on a full disk. The child ignores
SIGXFSZ, which would otherwise kill it, so the write raises OSError instead. Then, in this process, the old
checkpoint must still load and equal the old model, the error must name the file, and no temporary file may
be left behind.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minillm import data
from minillm.models import GPT, GPTConfig, from_pretrained
from minillm.peft import add_lora, load_adapter, lora_state_dict, save_adapter
from minillm.tokenizer import BPETokenizer

pytest.importorskip("resource", reason="file-size limits (RLIMIT_FSIZE) are POSIX only")
ROOT = Path(__file__).resolve().parents[1]


def gpt(hidden_size: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=96, hidden_size=hidden_size, num_layers=2, num_heads=2, max_seq_len=32))


def save_on_a_full_disk(make_and_save: str, new_file: str, folder: Path) -> str:
    """Run `make_and_save` (code defining `save(folder)`) in a child process whose files may not grow beyond
    half the size of `new_file` as an unlimited save writes it (measured first in a scratch folder), saving
    into `folder`; return what the child's OSError said."""
    measure_then_fail = textwrap.dedent(f"""
        scratch = Path(tempfile.mkdtemp())
        save(scratch)  # without a limit, to measure the new file
        size = (scratch / {new_file!r}).stat().st_size
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us at the limit: we want OSError
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            save(Path(sys.argv[1]))
        except OSError as err:
            print(err)
            sys.exit(0)
        sys.exit("the save did not fail: the limit did not bite")
    """)
    child = "import resource, signal, sys, tempfile\nfrom pathlib import Path\n" + textwrap.dedent(make_and_save) \
        + measure_then_fail
    done = subprocess.run([sys.executable, "-c", child, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"child failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout.strip()


def assert_no_leftovers(folder: Path, expected: set[str]):
    assert {p.name for p in folder.iterdir()} == expected, "a failed save must leave no temporary files behind"


def test_save_pretrained_on_a_full_disk_keeps_the_old_checkpoint(tmp_path):
    old = gpt(hidden_size=16, seed=0)
    old.save_pretrained(tmp_path)
    message = save_on_a_full_disk("""
        import torch
        from minillm.models import GPT, GPTConfig
        torch.manual_seed(1)
        new = GPT(GPTConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=2, max_seq_len=32))
        def save(where):
            new.save_pretrained(where)
    """, "model.safetensors", tmp_path)
    assert message.startswith(f"[Errno 27] could not write {tmp_path / 'model.safetensors'} (File too large); "
                              "nothing was replaced"), message
    assert_no_leftovers(tmp_path, {"config.json", "model.safetensors"})
    loaded = from_pretrained(tmp_path)
    assert loaded.config == old.config
    for (name, expected), got in zip(old.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got, expected), f"{name} changed although the save failed"


def test_save_adapter_on_a_full_disk_keeps_the_old_adapter(tmp_path):
    old = add_lora(gpt(hidden_size=16, seed=0), r=2, alpha=4, target_modules=["c_attn"])
    with torch.no_grad():
        for name, weight in lora_state_dict(old).items():
            weight.copy_(torch.randn_like(weight))  # lora_B starts at zero: make the adapter tell apart
    save_adapter(old, tmp_path)
    message = save_on_a_full_disk("""
        import torch
        from minillm.models import GPT, GPTConfig
        from minillm.peft import add_lora, save_adapter
        base = GPT(GPTConfig(vocab_size=96, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=32))
        new = add_lora(base, r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
        def save(where):
            save_adapter(new, where)
    """, "adapter_model.safetensors", tmp_path)
    assert message.startswith(f"[Errno 27] could not write {tmp_path / 'adapter_model.safetensors'}"), message
    assert_no_leftovers(tmp_path, {"adapter_config.json", "adapter_model.safetensors"})
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    loaded = load_adapter(gpt(hidden_size=16, seed=0), tmp_path)
    for name, expected in lora_state_dict(old).items():
        assert torch.equal(lora_state_dict(loaded)[name], expected), f"{name} changed although the save failed"


def test_tokenizer_save_on_a_full_disk_keeps_the_old_file(tmp_path):
    texts = [story.text for story in data.generate_stories(40, seed=1)]
    old = BPETokenizer.train(texts, 300)
    old.save(tmp_path / "tokenizer.json")
    message = save_on_a_full_disk("""
        from minillm import data
        from minillm.tokenizer import BPETokenizer
        new = BPETokenizer.train([story.text for story in data.generate_stories(40, seed=1)], 500)
        def save(where):
            new.save(where / "tokenizer.json")
    """, "tokenizer.json", tmp_path)
    assert message.startswith(f"[Errno 27] could not write {tmp_path / 'tokenizer.json'}"), message
    assert_no_leftovers(tmp_path, {"tokenizer.json"})
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.vocab, loaded.merges) == (old.vocab, old.merges)


def test_a_successful_save_replaces_the_files_and_leaves_nothing_else(tmp_path):
    gpt(hidden_size=16, seed=0).save_pretrained(tmp_path)
    new = gpt(hidden_size=32, seed=1)
    new.save_pretrained(tmp_path)
    assert_no_leftovers(tmp_path, {"config.json", "model.safetensors"})
    loaded = from_pretrained(tmp_path)
    assert loaded.config == new.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), new.state_dict().values()))
    assert oct(os.stat(tmp_path / "config.json").st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
