"""Self-checking exercises: the machinery every chapter's checks share (chapter 00 explains how to use them).

A chapter's exercise cell holds a stub that raises `NotImplementedError`; the next cell calls a check from
`minillm.exercises.chNN`. A check never raises: it prints one status line.

    Exercise 5.1 (causal mask): not attempted yet - replace the `raise NotImplementedError` above with your code.
    Exercise 5.1 (causal mask): passed ✓
    Exercise 5.1 (causal mask): not yet ✗ - case 2: ...: first mismatch at index (0, 1): expected 1, got 0
        hint: <names the idea>            (first failure)
        more: <says more, never the code> (second failure on, or hint("5.1"))

Expected answers come from a reference (usually torch) computed inside the check, never stored constants.

Build exercises (the chapter's centrepiece, written from a spec) also plug in: once the check passes,
`use(component=your_function)` swaps the learner's code into minillm for a block of cells, so the chapter's
end-to-end verdict against the real library runs on it; the swap is undone when the block ends.
Hints are staged: the first failure names the idea, a second failure (or `hint("5.5")`) says more.
`python -m minillm exercises --list` / `--check NOTEBOOK` list every exercise and grade a notebook.
"""

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Exercise:
    """One exercise of a chapter, as `python -m minillm exercises --list` shows it.

    A *build* exercise is the chapter's centrepiece; `component` is the name `use()` knows it by, `replaces` the
    package attribute it swaps (`"minillm.attention:scaled_dot_product_attention"`, or `module:Class.method`), and
    `hides` the names whose `show()` must come only after the exercise (tests/test_notebook_contract.py).
    """

    number: str                     # "5.5"
    title: str                      # "multi-head attention"
    kind: str = "practice"          # "build" or "practice"
    component: str | None = None    # use(component=...) swaps it in
    replaces: str | None = None     # "module.path:attribute" or "module.path:Class.attribute"
    hides: tuple[str, ...] = ()     # show() targets that would give the answer away
    check: str = ""                 # the name of its check function in minillm.exercises.chNN

    @property
    def label(self) -> str:
        return f"Exercise {self.number} ({self.title})"

    @property
    def chapter(self) -> int:
        return int(self.number.split(".")[0])


EXERCISES: dict[str, Exercise] = {}       # number -> Exercise, filled by @exercise as chapter modules import
_failures: dict[str, int] = {}            # label -> failed runs so far (the second one shows more)
_more_hints: dict[str, str] = {}          # label -> the second-level hint, known once the check has run


def exercise(number: str, title: str, kind: str = "practice", component: str | None = None,
             replaces: str | None = None, hides: Iterable[str] = ()) -> Callable:
    """Register the decorated check as exercise `number`; its `check(...)` call may then use `number` as title."""
    if kind not in ("build", "practice"):
        raise ValueError(f"exercise kind must be 'build' or 'practice', got {kind!r}")
    if kind == "build" and not (component and replaces):
        raise ValueError(f"build exercise {number} needs a component name and the attribute it replaces")

    def register(check_function: Callable) -> Callable:
        EXERCISES[number] = Exercise(number, title, kind, component, replaces, tuple(hides), check_function.__name__)
        return check_function
    return register


def all_exercises() -> list[Exercise]:
    """Every exercise of every chapter, in chapter order (imports each `minillm.exercises.chNN`)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("ch"):
            importlib.import_module(f"{__name__}.{module.name}")
    return sorted(EXERCISES.values(), key=lambda e: tuple(int(part) for part in e.number.split(".")))

class Mismatch(Exception):
    """Raised inside a check when the learner's answer differs from the reference."""


def first_mismatch(got, expected, atol: float = 1e-6, rtol: float = 1e-5) -> str | None:
    """Describe the first place where `got` differs from `expected`, or return None if they agree."""
    if hasattr(got, "detach"):  # a torch tensor
        got = got.detach().numpy()
    if hasattr(got, "data") and isinstance(getattr(got, "data"), np.ndarray):  # a minillm engine Tensor
        got = got.data
    if isinstance(expected, (str, bytes, bool, type(None))):
        return None if got == expected else f"expected {expected!r}, got {got!r}"
    expected = np.asarray(expected)
    if got is None or isinstance(got, (str, bytes)):  # e.g. a function that forgot to `return`
        wanted = f"an array of shape {expected.shape}" if expected.ndim else "a number"
        return f"expected {wanted}, got {got!r}"
    got = np.asarray(got)
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


def check(title: str, cases: Iterable[Callable[[], None]], hint: str = "", more: str = "") -> bool:
    """Run each case (a callable that raises `Mismatch` on a wrong answer), print one status line, return passed.

    `title` is "Exercise 5.1 (causal mask)" or, for a registered exercise, just "5.1". `hint` names the idea and
    is printed on the first failure; `more` is the second level, printed from the second failure on (or by
    `hint(number)`). Neither may contain the answer.
    """
    title = EXERCISES[title].label if title in EXERCISES else title
    if more:
        _more_hints[title] = more
    for number, case in enumerate(cases, start=1):
        try:
            case()
        except NotImplementedError:
            print(f"{title}: not attempted yet - replace the `raise NotImplementedError` above with your code.")
            return False
        except Mismatch as wrong:
            return _fail(title, f"case {number}: {wrong}", hint)
        except Exception as crash:  # the learner's code raised: report it instead of crashing the check
            return _fail(title, f"case {number}: your code raised {type(crash).__name__}: {crash}", hint)
    print(f"{title}: passed ✓")
    return True


def hint(number: str) -> None:
    """Print both hint levels of exercise `number` (run its check once first)."""
    label = EXERCISES[number].label if number in EXERCISES else f"Exercise {number}"
    if label not in _more_hints:
        print(f"{label}: run its check once first; a second failed run also prints the second hint.")
    else:
        print(f"{label}, more help: {_more_hints[label]}")


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


def _fail(title: str, problem: str, hint: str) -> bool:
    _failures[title] = _failures.get(title, 0) + 1
    more = _more_hints.get(title, "") if _failures[title] > 1 else ""
    print(f"{title}: not yet ✗ - {problem}" + (f"\n    hint: {hint}" if hint else "")
          + (f"\n    more: {more}" if more else ""))
    return False


# --- plug-in: the learner's component inside minillm ------------------------------------------------------


def _owner_and_name(replaces: str):
    """"pkg.module:Class.attr" -> (the Class object, "attr"); "pkg.module:attr" -> (the module, "attr")."""
    module_name, _, path = replaces.partition(":")
    owner = importlib.import_module(module_name)
    *classes, name = path.split(".")
    for cls in classes:
        owner = getattr(owner, cls)
    if name not in vars(owner):
        raise AttributeError(f"{replaces}: {owner!r} has no attribute {name!r} of its own to replace")
    return owner, name


def components() -> dict[str, Exercise]:
    """Every swappable component: its `use()` name -> its build exercise."""
    return {e.component: e for e in all_exercises() if e.component}


@contextmanager
def use(**swaps: Callable):
    """Run a block of cells with the learner's components inside minillm, e.g. `with use(attention=my_fn):`.

    Each name is a build exercise's component (`components()` lists them); the package attribute it replaces is
    looked up at call time by every caller, so the whole package runs the learner's code. The originals come
    back when the block ends, also on error. A component that still raises NotImplementedError ends the block
    early with one line (the stub is not written yet), so a chapter with untouched stubs runs top to bottom.
    """
    known = {e.component: e for e in EXERCISES.values() if e.component}
    if not set(swaps) <= set(known):
        known = components()
    unknown = sorted(set(swaps) - set(known))
    if unknown:
        raise ValueError(f"use(): no component named {', '.join(unknown)}; the components are {', '.join(sorted(known))}")
    saved = []
    try:
        for name, function in swaps.items():
            if not callable(function):
                raise TypeError(f"use({name}=...) needs a function, got {type(function).__name__}")
            owner, attr = _owner_and_name(known[name].replaces)
            original = vars(owner)[attr]
            saved.append((owner, attr, original))
            setattr(owner, attr, staticmethod(function) if isinstance(original, staticmethod) else function)
        yield
    except NotImplementedError:
        names = ", ".join(f"{known[n].component} (exercise {known[n].number})" for n in swaps)
        print(f"plug-in skipped: your {names} is not written yet - this block needs it.")
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def verdict(ok: bool, claim: str, detail: str = "") -> bool:
    """Print the one-line end-to-end verdict a plug-in block ends with: `claim ✓` or `claim ✗ (detail)`."""
    print(f"{claim}: " + ("✓" if ok else f"✗ - {detail}" if detail else "✗"))
    return ok
