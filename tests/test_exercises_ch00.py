"""Chapter 00's checks pass right answers, flag wrong ones and wait for untouched stubs; the softmax plugs in."""

import numpy as np
import pytest

from minillm.engine import Tensor
from minillm.engine import functional as F
from minillm.exercises import ch00, use
from exercise_helpers import stub, outputs


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
    ch00.check_softmax(lambda x: softmax(x.astype(np.float64)))  # right values, float32 turned into float64
    ch00.check_softmax(lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum())  # normalised over everything
    passed, stubbed, wrong, widened, whole_array = outputs(capsys)
    assert passed == "Exercise 0.1 (softmax): passed ✓"
    assert "not attempted yet" in stubbed
    assert wrong.startswith("Exercise 0.1 (softmax): not yet ✗ - case 3: softmax of a (1, 3) float64 array: "
                            "first mismatch")
    assert widened == ("Exercise 0.1 (softmax): not yet ✗ - case 6: softmax of a (2, 6) float32 array: expected "
                       "dtype float32 (the input's), got float64")
    assert whole_array.startswith("Exercise 0.1 (softmax): not yet ✗ - case 2: softmax of a (3, 7) float64 array: "
                                  "first mismatch at index (0, 0)")


@pytest.mark.parametrize("answer, shown", [(None, "None"), ("softmax", "'softmax'")])
def test_softmax_check_names_a_non_array_answer(capsys, answer, shown):
    ch00.check_softmax(lambda x: answer)
    (line,) = outputs(capsys)
    assert line == (f"Exercise 0.1 (softmax): not yet ✗ - case 1: softmax of a (5,) float64 array: expected an array "
                    f"of shape (5,), got {shown}")


def test_softmax_plugged_in_matches_torch(capsys):
    with use(softmax=softmax):
        assert F.stable_softmax is softmax
        assert ch00.end_to_end_softmax()
    assert capsys.readouterr().out == (
        "engine causal self-attention with your softmax matches torch's scaled_dot_product_attention (output and "
        "input gradient, float64, |Δ| <= 1e-10 + 1e-10·|torch's|): ✓\n")


def test_naive_softmax_plugged_in_fails_end_to_end(capsys):
    with use(softmax=naive_softmax):
        assert not ch00.end_to_end_softmax()
    out = capsys.readouterr().out
    assert out.startswith("engine causal self-attention with your softmax matches torch's")
    assert "✗ - scores in the thousands, output: first mismatch at index (0, 1, 0)" in out and out.rstrip().endswith("got nan")


def test_stub_plugged_in_is_skipped(capsys):
    with use(softmax=stub):
        ch00.end_to_end_softmax()
    assert capsys.readouterr().out.startswith("plug-in skipped: your softmax (exercise 0.1) is not written yet")


def test_plug_in_leaves_the_engine_unchanged():
    original = F.stable_softmax
    scores = Tensor(np.random.default_rng(3).normal(size=(2, 3, 4)), requires_grad=True)

    def reference():
        out = F.softmax(scores, dim=1)
        (out * out).sum().backward()
        grad, scores.grad = scores.grad, None
        return out.data.tobytes() + grad.tobytes()

    before = reference()
    with use(softmax=naive_softmax):
        assert F.stable_softmax is naive_softmax
    with pytest.raises(ZeroDivisionError):
        with use(softmax=softmax):
            1 / 0
    assert F.stable_softmax is original
    assert reference() == before


def test_count_parameters_check(capsys):
    ch00.check_count_parameters(lambda d_in, d_out, bias: d_in * d_out + (d_out if bias else 0))
    ch00.check_count_parameters(lambda d_in, d_out, bias: d_in * d_out + d_out)
    passed, wrong = outputs(capsys)
    assert passed.endswith("passed ✓")
    assert "case 3: Linear(64, 10, bias=False): expected 640, got 650" in wrong


def test_one_hot_check(capsys):
    ch00.check_one_hot(lambda ids, n: np.eye(n, dtype=np.float32)[ids])
    ch00.check_one_hot(lambda ids, n: np.eye(n, dtype=np.float32)[ids.ravel()])
    ch00.check_one_hot(lambda ids, n: np.eye(n, dtype=np.int64)[ids])  # right values, integer dtype
    passed, wrong, integers = outputs(capsys)
    assert passed.endswith("passed ✓")
    assert "case 3" in wrong and "expected shape (2, 2, 4), got shape (4, 4)" in wrong
    assert integers == ("Exercise 0.3 (one-hot): not yet ✗ - case 1: one_hot([0, 2, 1], 3): expected dtype float32 "
                        "(targets are compared with float probabilities), got int64")
