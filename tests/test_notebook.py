"""The notebook helpers: `show` prints the package's real source; `setup` makes runs repeatable."""

import inspect

import numpy as np
import pytest
import torch

from minillm import notebook, show
from minillm.exercises import first_mismatch


def test_show_prints_the_source_that_runs(capsys):
    show(first_mismatch)
    out = capsys.readouterr().out
    assert out.startswith("# minillm.exercises.first_mismatch\n")
    assert inspect.getsource(first_mismatch).strip() in out


def test_show_dedents_methods(capsys):
    show(notebook.setup)
    assert "\ndef setup(seed: int = 0)" in capsys.readouterr().out


def test_show_rejects_what_has_no_source():
    with pytest.raises(TypeError, match="needs a function, class, method or module, got int"):
        show(3)


def test_setup_makes_random_draws_repeatable():
    notebook.setup(seed=7)
    first = torch.randn(3), np.random.rand(2)
    notebook.setup(seed=7)
    second = torch.randn(3), np.random.rand(2)
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert torch.get_num_threads() == 1
