"""Chapter 02's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import numpy as np

from minillm.engine import Tensor
from minillm.exercises import ch02
from exercise_helpers import stub, outputs


# --- 2.1 tanh backward ----------------------------------------------------------------------------


def tanh_backward(x, grad_out):
    return grad_out * (1 - np.tanh(x) ** 2)


def test_tanh_backward_check(capsys):
    ch02.check_tanh_backward(tanh_backward)
    ch02.check_tanh_backward(stub)
    ch02.check_tanh_backward(lambda x, grad_out: grad_out * (1 - x**2))  # differentiated x, not tanh(x)
    ch02.check_tanh_backward(lambda x, grad_out: 1 - np.tanh(x) ** 2)  # the local gradient alone
    passed, stubbed, squared_x, local_only = outputs(capsys)
    assert passed == "Exercise 2.1 (tanh backward): passed ✓"
    assert stubbed.startswith("Exercise 2.1 (tanh backward): not attempted yet")
    for wrong in (squared_x, local_only):
        assert wrong.startswith("Exercise 2.1 (tanh backward): not yet ✗ - case 1: gradient for x of shape (5,): "
                                "first mismatch at index (0,)")


# --- 2.2 matmul backward --------------------------------------------------------------------------


def matmul_backward(a, b, grad_out):
    grad_a = grad_out @ np.swapaxes(b, -1, -2)  # (..., m, k)
    grad_b = np.swapaxes(a, -1, -2) @ grad_out  # (..., k, n)
    if grad_b.ndim > b.ndim:  # one b was used by every matrix of the batch: add up its uses
        grad_b = grad_b.reshape(-1, *b.shape).sum(axis=0)
    return grad_a, grad_b


def test_matmul_backward_check(capsys):
    ch02.check_matmul_backward(matmul_backward)
    ch02.check_matmul_backward(stub)
    ch02.check_matmul_backward(lambda a, b, g: (g @ np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2) @ g))
    ch02.check_matmul_backward(lambda a, b, g: (g @ b, a @ g))  # no transposes at all
    ch02.check_matmul_backward(lambda a, b, g: [g @ b.T, a.T @ g])
    passed, stubbed, unsummed, untransposed, a_list = outputs(capsys)
    assert passed == "Exercise 2.2 (matmul backward): passed ✓"
    assert "not attempted yet" in stubbed
    assert unsummed == ("Exercise 2.2 (matmul backward): not yet ✗ - case 4: grad_b for a (2, 3, 4) @ b (4, 5): "
                        "expected shape (4, 5), got shape (2, 4, 5)")
    assert untransposed.startswith("Exercise 2.2 (matmul backward): not yet ✗ - case 1: your code raised ValueError")
    assert a_list.endswith("case 1: expected a tuple (grad_a, grad_b), got list")


# --- 2.3 softmax backward -------------------------------------------------------------------------


def softmax_backward(y, grad_out):
    return y * (grad_out - (grad_out * y).sum(axis=-1, keepdims=True))


def test_softmax_backward_check(capsys):
    ch02.check_softmax_backward(softmax_backward)
    ch02.check_softmax_backward(stub)
    ch02.check_softmax_backward(lambda y, grad_out: y * (1 - y) * grad_out)  # the Jacobian's diagonal only
    ch02.check_softmax_backward(lambda y, grad_out: y * (grad_out - grad_out.sum(axis=-1, keepdims=True)))
    passed, stubbed, diagonal, unweighted = outputs(capsys)
    assert passed == "Exercise 2.3 (softmax backward): passed ✓"
    assert "not attempted yet" in stubbed
    for wrong in (diagonal, unweighted):
        assert wrong.startswith("Exercise 2.3 (softmax backward): not yet ✗ - case 1: gradient for x of shape (5,): "
                                "first mismatch at index (0,)")


# --- 2.4 softplus as an engine op -----------------------------------------------------------------


def softplus(x):
    out = np.maximum(x.data, 0) + np.log1p(np.exp(-np.abs(x.data)))
    slope = np.exp(x.data - out)  # sigmoid(x)
    return Tensor._op(out, (x,), lambda g: (g * slope,), "softplus")


def softplus_wrong_backward(x):
    out = np.maximum(x.data, 0) + np.log1p(np.exp(-np.abs(x.data)))
    return Tensor._op(out, (x,), lambda g: (g * out,), "softplus")  # copied exp's backward


def test_softplus_check(capsys):
    ch02.check_softplus(softplus)
    ch02.check_softplus(stub)
    with np.errstate(over="ignore"):
        ch02.check_softplus(lambda x: (1 + x.exp()).log())  # right maths, but exp(800) overflows
    ch02.check_softplus(lambda x: Tensor(softplus(x).data))  # right values, no graph
    ch02.check_softplus(softplus_wrong_backward)
    ch02.check_softplus(lambda x: softplus(x).data)
    passed, stubbed, overflow, no_graph, wrong_backward, an_array = outputs(capsys)
    assert passed == "Exercise 2.4 (softplus op): passed ✓"
    assert "not attempted yet" in stubbed
    assert overflow == ("Exercise 2.4 (softplus op): not yet ✗ - case 3: softplus(x) for x of shape (5,): "
                        "first mismatch at index (4,): expected 800, got inf")
    assert no_graph.startswith("Exercise 2.4 (softplus op): not yet ✗ - case 1: softplus(x) for x of shape (6,) "
                               "recorded no graph")
    assert wrong_backward.startswith("Exercise 2.4 (softplus op): not yet ✗ - case 1: gradient for x of shape (6,): "
                                     "first mismatch at index (0,)")
    assert an_array.endswith("case 1: softplus should return a minillm Tensor, got ndarray")


# --- 2.5 MLP backward by hand --------------------------------------------------------------------


def mlp_backward(x, w1, b1, w2, b2, grad_out, tanh_slope=lambda pre, h: 1 - h**2, sum_biases=True):
    pre = x @ w1 + b1  # (N, H)
    h = np.tanh(pre)  # (N, H)
    grad_w2 = h.T @ grad_out  # (H, O)
    grad_b2 = grad_out.sum(axis=0) if sum_biases else grad_out  # (O,)
    grad_pre = (grad_out @ w2.T) * tanh_slope(pre, h)  # (N, H)
    grad_w1 = x.T @ grad_pre  # (I, H)
    grad_b1 = grad_pre.sum(axis=0) if sum_biases else grad_pre  # (H,)
    return grad_pre @ w1.T, grad_w1, grad_b1, grad_w2, grad_b2


def test_mlp_backward_check(capsys):
    ch02.check_mlp_backward(mlp_backward)
    ch02.check_mlp_backward(stub)
    ch02.check_mlp_backward(lambda *args: mlp_backward(*args, tanh_slope=lambda pre, h: 1 - pre**2))
    ch02.check_mlp_backward(lambda *args: mlp_backward(*args, sum_biases=False))
    ch02.check_mlp_backward(lambda *args: mlp_backward(*args)[1:])
    passed, stubbed, wrong_slope, unsummed, four = outputs(capsys)
    assert passed == "Exercise 2.5 (MLP backward by hand): passed ✓"
    assert "not attempted yet" in stubbed
    assert wrong_slope.startswith("Exercise 2.5 (MLP backward by hand): not yet ✗ - case 1: gradient for x "
                                  "(x (4, 3), hidden size 5, output size 2): first mismatch at index (0, 0)")
    assert unsummed == ("Exercise 2.5 (MLP backward by hand): not yet ✗ - case 1: gradient for b1 (x (4, 3), "
                        "hidden size 5, output size 2): expected shape (5,), got shape (4, 5)")
    assert four.endswith("case 1: expected a tuple of 5 gradients (x, w1, b1, w2, b2), got tuple of length 4")
