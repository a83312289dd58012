"""Self-checking exercises: the machinery every chapter's checks share (chapter 00 explains how to use them).

A chapter's exercise cell holds a stub that raises `NotImplementedError`; the next cell calls a check from
`minillm.exercises.chNN`. A check never raises: it prints one status line.

    Exercise 2.1 (tanh backward): not attempted yet - replace the `raise NotImplementedError` above.
    Exercise 2.1 (tanh backward): passed ✓
    Exercise 2.1 (tanh backward): not yet ✗ - case 2: first mismatch at index (0, 3): expected 0.4199, got 0.5
        hint: d tanh(x)/dx = 1 - tanh(x)**2

Expected answers come from a reference (usually torch) computed inside the check, never stored constants.
"""

from collections.abc import Callable, Iterable

import numpy as np

class Mismatch(Exception):
    """Raised inside a check when the learner's answer differs from the reference."""


def first_mismatch(got, expected, atol: float = 1e-6, rtol: float = 1e-5) -> str | None:
    """Describe the first place where `got` differs from `expected`, or return None if they agree."""
    if hasattr(got, "detach"):  # a torch tensor
        got = got.detach().numpy()
    if hasattr(got, "data") and isinstance(getattr(got, "data"), np.ndarray):  # a minillm engine Tensor
        got = got.data
    if isinstance(expected, (str, bytes, bool, type(None))) or isinstance(got, (str, bytes, type(None))):
        return None if got == expected else f"expected {expected!r}, got {got!r}"
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        return f"expected shape {expected.shape}, got shape {got.shape}"
    if got.dtype.kind not in "biuf" or expected.dtype.kind not in "biuf":
        return None if np.array_equal(got, expected) else f"expected {expected!r}, got {got!r}"
    close = np.isclose(got, expected, atol=atol, rtol=rtol)
    if close.all():
        return None
    index = tuple(int(i) for i in np.argwhere(~close)[0])
    where = f"first mismatch at index {index}: " if got.ndim else ""
    return f"{where}expected {expected[index]:.6g}, got {got[index]:.6g}"


def check(title: str, cases: Iterable[Callable[[], None]], hint: str = "") -> None:
    """Run each case (a callable that raises `Mismatch` on a wrong answer) and print one status line."""
    for number, case in enumerate(cases, start=1):
        try:
            case()
        except NotImplementedError:
            print(f"{title}: not attempted yet - replace the `raise NotImplementedError` above with your code.")
            return
        except Mismatch as wrong:
            return _fail(title, f"case {number}: {wrong}", hint)
        except Exception as crash:  # the learner's code raised: report it instead of crashing the check
            return _fail(title, f"case {number}: your code raised {type(crash).__name__}: {crash}", hint)
    print(f"{title}: passed ✓")


def expect_equal(got, expected, what: str = "result", atol: float = 1e-6, rtol: float = 1e-5) -> None:
    """Raise `Mismatch` naming `what` if `got` and `expected` differ beyond the tolerances."""
    problem = first_mismatch(got, expected, atol=atol, rtol=rtol)
    if problem is not None:
        raise Mismatch(f"{what}: {problem}")


def expect_tensor(got, expected, what: str = "result", check_dtype: bool = True):
    """Raise `Mismatch` unless `got` is a torch tensor of `expected`'s shape (and dtype); return it detached on the CPU."""
    import torch  # here, not at the top: the numpy chapters (01-03) never need torch

    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{what}: expected a torch tensor, got {type(got).__name__}")
    if got.shape != expected.shape:
        raise Mismatch(f"{what}: expected shape {tuple(expected.shape)}, got shape {tuple(got.shape)}")
    if check_dtype and got.dtype != expected.dtype:
        raise Mismatch(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
    return got.detach().cpu()


def _fail(title: str, problem: str, hint: str) -> None:
    print(f"{title}: not yet ✗ - {problem}" + (f"\n    hint: {hint}" if hint else ""))
