"""The chapters' optional "On a real model" sections, run on their present branch.

nbval sees only the absent branch (CI has no real checkpoint), so each section's code is run here against a
tiny GPT-2 laid out as "gpt2" in a temporary Hugging Face cache: the same cells, the same `real_model("gpt2")`
call, in a fresh process. A section that stops working on a real model fails here instead of on a learner's
machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_helpers import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TAG = "real-model"


def sections(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if TAG in c.get("metadata", {}).get("tags", [])]


NOTEBOOKS = [p for folder in ("chapters", "solutions") for p in sorted((ROOT / folder).glob("*.ipynb")) if sections(p)]


def test_the_chapters_that_promise_a_real_model_have_the_section():
    have = {p.name[:2] for p in NOTEBOOKS if p.parent.name == "chapters"}
    assert {"06", "07", "09", "12", "14"} <= have, f"chapters with an 'On a real model' section: {sorted(have)}"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--gpt2" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    write_checkpoint(snapshot, "gpt2", n_positions=512)
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text(commit)
    return cache


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_model_section_runs_on_a_checkpoint(path, hub_cache):
    code = "from minillm.notebook import setup\nsetup()\n" + "\n\n".join(sections(path))
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=path.parent,
                          timeout=600)
    assert done.returncode == 0, f"{path.name}: the real-model section failed:\n{done.stderr[-3000:]}"
    assert "is not on this machine" not in done.stdout, f"{path.name}: the checkpoint was not found:\n{done.stdout}"
    assert "False" not in done.stdout, f"{path.name}: a verdict failed on the checkpoint:\n{done.stdout}"
