"""`python -m minillm doctor`: one [OK]/[FAIL] line per component the course needs (chapter 00).

Each check imports its component and makes it do a little real work, so a broken install shows up here
rather than halfway through a chapter. Paste the output into an issue when asking for help.
"""

import importlib.metadata
import logging
import os
import platform
import sys
import warnings
from collections.abc import Callable

REINSTALL = "run `make lab` (or `make test`), which installs the pinned versions into .venv"


class CheckFailed(Exception):
    """Raised by a check with the hint a learner should follow."""

    def __init__(self, detail: str, hint: str = REINSTALL):
        super().__init__(detail)
        self.hint = hint


def check_python() -> str:
    version = platform.python_version()
    if sys.version_info < (3, 11):
        raise CheckFailed(f"Python {version} is too old", "install Python 3.11 or newer (pyenv, conda or python.org)")
    return f"Python {version}"


def check_torch() -> str:
    import torch

    x = torch.arange(6.0).reshape(2, 3)
    if (x @ x.T)[1, 1].item() != 50.0:
        raise CheckFailed("torch computed a wrong matmul")
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return f"torch {torch.__version__} ({build})"


def check_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no GPU: everything runs on the CPU, Triton kernels in the interpreter (that is fine)"
    return f"GPU {torch.cuda.get_device_name(0)}"


def check_triton() -> str:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, so set it first
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(10, device=device)
    add_one[(1,)](x, x.numel(), BLOCK=16)
    if not torch.equal(x.cpu(), torch.ones(10)):
        raise CheckFailed("a tiny Triton kernel gave a wrong result")
    from minillm.quant import kernels  # chapter 13's kernels; the package chose their mode when imported

    mode = ("kernels run in the interpreter (TRITON_INTERPRET=1)" if kernels.INTERPRETED
            else "kernels compiled for the GPU")
    return f"triton {triton.__version__}: {mode}"


def check_bitsandbytes() -> str:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
    import torch

    w = torch.linspace(-1, 1, 128)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    error = (bnbf.dequantize_4bit(packed, state) - w).abs().max().item()
    if error > 0.2:
        raise CheckFailed(f"NF4 round trip error {error:.3f} is too large", "reinstall bitsandbytes 0.50.x")
    return f"bitsandbytes {bitsandbytes.__version__}: CPU backend quantizes NF4"


def _importable(module: str, distribution: str) -> Callable[[], str]:
    def check() -> str:
        importlib.import_module(module)
        return f"{distribution} {importlib.metadata.version(distribution)}"

    check.__name__ = f"check_{module}"
    return check


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("python", check_python),
    ("numpy", _importable("numpy", "numpy")),
    ("torch", check_torch),
    ("gpu", check_gpu),
    ("triton", check_triton),
    ("transformers", _importable("transformers", "transformers")),
    ("tokenizers", _importable("tokenizers", "tokenizers")),
    ("peft", _importable("peft", "peft")),
    ("bitsandbytes", check_bitsandbytes),
    ("jupyterlab", _importable("jupyterlab", "jupyterlab")),
    ("nbval", _importable("nbval", "nbval")),
]


def run_checks(checks=CHECKS) -> list[tuple[bool, str, str, str]]:
    """Run every check; return (ok, name, detail, hint) per component. Never raises."""
    results = []
    for name, check in checks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results.append((True, name, check(), ""))
        except CheckFailed as err:
            results.append((False, name, str(err), err.hint))
        except Exception as err:  # an import error or a crash is exactly what the doctor reports
            results.append((False, name, f"{type(err).__name__}: {err}", REINSTALL))
    return results


def main(checks=CHECKS) -> int:
    """Print one line per component; return 1 if any failed (the exit code of `python -m minillm doctor`)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a CPU-feature probe warns on import
    results = run_checks(checks)
    for ok, name, detail, hint in results:
        print(f"{'[OK]' if ok else '[FAIL]':<7}{name:<13}{detail}")
        if not ok:
            print(f"{'':<7}hint: {hint}")
    failed = sum(not ok for ok, *_ in results)
    print(f"{len(results) - failed} ok, {failed} failed" + ("" if not failed else " - see the hints above"))
    return 1 if failed else 0
