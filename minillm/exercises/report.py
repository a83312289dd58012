"""`python -m minillm exercises`: the table of every exercise, and a progress report for a learner's notebook.

    python -m minillm exercises --list
    python -m minillm exercises --check chapters/05_attention.ipynb [more notebooks ...]

`--check` runs the notebook top to bottom in a fresh kernel (a cell that raises does not stop it), reads the
status line each check printed, and reports every exercise of that chapter as passed, not yet or not attempted.
It never writes the notebook and exits 0 even when exercises fail: it is a progress report, which an instructor
can also run over a whole class's notebooks.
"""

import re
from pathlib import Path

from minillm.exercises import Exercise, all_exercises

STATUS = re.compile(r"^Exercise (\d+\.\d+) \(.*?\): (passed|not yet|not attempted)")


def list_table(exercises: list[Exercise]) -> str:
    """One row per exercise: chapter, number, kind, title and the minillm component a build exercise replaces."""
    rows = [("ch", "exercise", "kind", "title", "replaces in minillm (use(...) name)")]
    for e in exercises:
        swap = f"{e.replaces.replace(':', '.')} ({e.component})" if e.replaces else "-"
        rows.append((f"{e.chapter:02d}", e.number, e.kind, e.title, swap))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    builds = sum(e.kind == "build" for e in exercises)
    return "\n".join(lines + [f"{len(exercises)} exercises, {builds} of them build exercises"])


def notebook_statuses(path: Path) -> dict[str, str]:
    """Execute a copy of the notebook in memory; return exercise number -> the last status its check printed."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    statuses = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            for line in output.get("text", "").splitlines() if output.get("name") == "stdout" else []:
                if match := STATUS.match(line):
                    statuses[match[1]] = match[2]
    return statuses


def check_report(path: Path, exercises: list[Exercise]) -> str:
    """The progress table of one notebook: each exercise of its chapter with its status, then the totals."""
    chapter = int(re.match(r"(\d+)", path.name)[1])
    mine = [e for e in exercises if e.chapter == chapter]
    statuses = notebook_statuses(path)
    lines = [f"{path}"]
    counts = {"passed": 0, "not yet": 0, "not attempted": 0}
    for e in mine:
        status = statuses.get(e.number, "not attempted")
        counts[status] += 1
        mark = {"passed": "✓", "not yet": "✗", "not attempted": "·"}[status]
        lines.append(f"  {mark} {e.label:<52} {e.kind:<9} {status}")
    lines.append(f"  {len(mine)} exercises: {counts['passed']} passed, {counts['not yet']} not yet, "
                 f"{counts['not attempted']} not attempted")
    return "\n".join(lines)


def main(list_all: bool, notebooks: list[str]) -> int:
    exercises = all_exercises()
    if list_all or not notebooks:
        print(list_table(exercises))
    for name in notebooks:
        path = Path(name)
        if not path.is_file() or path.suffix != ".ipynb" or not re.match(r"\d+", path.name):
            print(f"{name}: not a chapter notebook (expected a file like chapters/05_attention.ipynb)")
            continue
        print(check_report(path.resolve(), exercises))
    return 0
