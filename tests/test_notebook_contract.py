"""The notebook contract of COURSE.md §3–4, checked on the files as committed (nbval checks the outputs)."""

import json
import re
from pathlib import Path

import pytest

from minillm.exercises import all_exercises

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
NOTEBOOKS = CHAPTERS + sorted((ROOT / "solutions").glob("*.ipynb"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def checks_called(nb: dict) -> list[str]:
    return [m for c in code_cells(nb) for m in re.findall(r"\bch\d\d\.check_\w+", "".join(c["source"]))]


def test_every_chapter_has_a_solution_twin():
    assert CHAPTERS, "no chapters found"
    for chapter in CHAPTERS:
        assert (ROOT / "solutions" / chapter.name).exists(), f"solutions/{chapter.name} is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_is_regenerated_and_clean(path):
    nb = load(path)
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", (
        f"{path.name}: kernelspec must be python3 (the .venv kernel of `make lab`); run `make notebooks`")
    counts = [c["execution_count"] for c in code_cells(nb)]
    assert None not in counts, f"{path.name}: a code cell was never executed; run `make notebooks`"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: cells ran out of order; run `make notebooks`"
    assert "language_info" not in nb["metadata"] or set(nb["metadata"]["language_info"]) == {"name"}, (
        f"{path.name}: volatile metadata left in the file; run `make notebooks`")
    first = "".join(code_cells(nb)[0]["source"])
    assert "setup()" in first, f"{path.name}: the first code cell must call minillm.notebook.setup()"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_and_solution_run_the_same_checks(chapter):
    mine, solved = checks_called(load(chapter)), checks_called(load(ROOT / "solutions" / chapter.name))
    assert len(set(mine)) >= 3, f"{chapter.name}: a chapter needs at least 3 self-checking exercises, has {mine}"
    assert mine == solved, f"{chapter.name}: the solution must run the same checks in the same order"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_stubs_wait_and_solutions_pass(chapter):
    def statuses(nb):
        return [line for c in code_cells(nb) for o in c["outputs"] if o.get("name") == "stdout"
                for line in "".join(o["text"]).splitlines() if line.startswith("Exercise ")]

    waiting, solved = statuses(load(chapter)), statuses(load(ROOT / "solutions" / chapter.name))
    assert waiting and all("not attempted yet" in s for s in waiting), f"{chapter.name}: stubs must be untouched"
    assert solved and all(s.endswith("passed ✓") for s in solved), f"solutions/{chapter.name}: {solved}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_build_exercises_come_before_the_package_shows_the_answer(path):
    """COURSE.md §4: no cell before a build exercise's check may `show()` the component the learner writes."""
    chapter = int(path.name[:2])
    sources = ["".join(c["source"]) for c in code_cells(load(path))]
    for build in [e for e in all_exercises() if e.chapter == chapter and e.kind == "build"]:
        call = re.compile(rf"\bch{chapter:02d}\.{build.check}\(")
        at = next((i for i, source in enumerate(sources) if call.search(source)), None)
        assert at is not None, f"{path.name}: build exercise {build.number} ({build.check}) is never checked"
        for name in build.hides:
            shown = re.compile(rf"\bshow\(\s*{re.escape(name)}\s*\)")
            early = [i for i, source in enumerate(sources[:at]) if shown.search(source)]
            assert not early, (f"{path.name}: show({name}) in code cell {early[0] + 1} gives away build exercise "
                               f"{build.number}, checked in code cell {at + 1}; move it after the exercise")
