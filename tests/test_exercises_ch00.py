"""Chapter 00's checks pass right answers, flag wrong ones and wait for untouched stubs."""

import numpy as np

from minillm.exercises import ch00
from exercise_helpers import stub


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def naive_softmax(x):  # overflows on large logits
    return np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)


def test_softmax_check(capsys):
    ch00.check_softmax(softmax)
    ch00.check_softmax(stub)
    with np.errstate(over="ignore", invalid="ignore"):
        ch00.check_softmax(naive_softmax)
    passed, stubbed, wrong = capsys.readouterr().out.splitlines()[:3]
    assert passed == "Exercise 0.1 (softmax): passed ✓"
    assert "not attempted yet" in stubbed
    assert wrong.startswith("Exercise 0.1 (softmax): not yet ✗ - case 3: softmax of a (1, 3) array: first mismatch")


def test_count_parameters_check(capsys):
    ch00.check_count_parameters(lambda d_in, d_out, bias: d_in * d_out + (d_out if bias else 0))
    ch00.check_count_parameters(lambda d_in, d_out, bias: d_in * d_out + d_out)
    passed, wrong = capsys.readouterr().out.splitlines()[:2]
    assert passed.endswith("passed ✓")
    assert "case 3: Linear(64, 10, bias=False): expected 640, got 650" in wrong


def test_one_hot_check(capsys):
    ch00.check_one_hot(lambda ids, n: np.eye(n, dtype=np.float32)[ids])
    ch00.check_one_hot(lambda ids, n: np.eye(n)[ids.ravel()])
    passed, wrong = capsys.readouterr().out.splitlines()[:2]
    assert passed.endswith("passed ✓")
    assert "case 3" in wrong and "expected shape (2, 2, 4), got shape (4, 4)" in wrong
