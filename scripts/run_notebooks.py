"""Re-execute notebooks in place and normalise them, so that a second run changes no byte (`make notebooks`).

    python scripts/run_notebooks.py                     # every notebook in chapters/ and solutions/
    python scripts/run_notebooks.py chapters/02_autograd.ipynb

Each notebook runs top to bottom in a fresh kernel from its own folder. Then streams are coalesced (timing
decides how a kernel chunks stdout, so uncoalesced outputs differ run to run) and volatile metadata is
dropped. Outputs are never edited by hand; this script is the only thing that writes them.

A cell tagged `volatile-output` (wall-clock timings, say) runs like every other cell, but its outputs are not
stored: they differ on every run, so storing them would make every regeneration a diff. Such a cell also carries
`nbval-ignore-output`, and a learner sees its output when running the notebook.
"""

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbconvert.preprocessors import CoalesceStreamsPreprocessor, ExecutePreprocessor

ROOT = Path(__file__).resolve().parents[1]
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
CELL_TIMEOUT_S = 600
VOLATILE_TAG = "volatile-output"


def normalise(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep only metadata that does not change between runs or machines."""
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
        if cell.cell_type == "code" and VOLATILE_TAG in cell.metadata.get("tags", []):
            cell.outputs = []
        elif cell.cell_type == "code":
            for output in cell.outputs:
                output.get("metadata", {}).pop("transient", None)
    return CoalesceStreamsPreprocessor().preprocess(nb, {})[0]


def run(path: Path) -> float:
    """Execute one notebook in place; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = KERNELSPEC
    start = time.perf_counter()
    executor = ExecutePreprocessor(timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False)
    executor.preprocess(nb, {"metadata": {"path": str(path.parent)}})
    seconds = time.perf_counter() - start
    nbformat.write(normalise(nb), path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: chapters/*.ipynb and solutions/*.ipynb")
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "chapters").glob("*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb"))
    total = 0.0
    for path in paths:
        seconds = run(path.resolve())
        total += seconds
        print(f"{seconds:6.1f} s  {path.resolve().relative_to(ROOT)}", flush=True)
    print(f"{total:6.1f} s  in all ({len(paths)} notebooks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
