"""Course helpers for notebooks: one-line set-up and `show`, which prints the package's own source.

Chapter 00 introduces both. Every chapter starts with `from minillm.notebook import setup; setup()` so that
its stored outputs are the same on every run (nbval re-runs each notebook and compares them).
"""

import inspect
import logging
import os
import random
import textwrap
import warnings

import numpy as np

# Warnings whose text depends on the machine (CPU features, paths) or on library defaults we cannot
# change; each was seen on this stack (../shared/notes/transformers-peft-nbval.md §A).
_MACHINE_DEPENDENT_WARNINGS = [
    dict(message="IProgress not found"),
    dict(category=FutureWarning),
    dict(message="Position ids are not supported"),
    dict(message=".*loss_type=None.*"),
]


def setup(seed: int = 0) -> None:
    """Seed every generator, use one thread, set print options and silence machine-dependent warnings.

    One thread matters: a reduction summed by 2 threads rounds differently from 1 thread, and a notebook's
    stored numbers must not depend on the machine's core count.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-feature probe logs on import
    for kwargs in _MACHINE_DEPENDENT_WARNINGS:
        warnings.filterwarnings("ignore", **kwargs)

    from threadpoolctl import threadpool_limits
    threadpool_limits(1)  # numpy's BLAS

    import torch
    torch.set_num_threads(1)
    torch.set_printoptions(precision=4, sci_mode=False)
    np.set_printoptions(precision=4, suppress=True)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from minillm.engine import manual_seed
    manual_seed(seed)


def show(obj) -> None:
    """Print the source of a package object (function, class, method or module) with where it lives.

    Chapters call this instead of copying code, so what a learner reads is exactly what runs, and nbval
    fails when the package changes without the chapter being regenerated.
    """
    try:
        source = inspect.getsource(obj)
    except TypeError as err:
        raise TypeError(f"show() needs a function, class, method or module, got {type(obj).__name__}") from err
    module = inspect.getmodule(obj)
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", ""))
    where = module.__name__ if module is not None else "?"
    header = where if name == where else f"{where}.{name}"
    print(f"# {header}\n{textwrap.dedent(source).rstrip()}")
