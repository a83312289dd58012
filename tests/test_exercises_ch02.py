"""Chapter 02's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

from collections import deque

import numpy as np
import pytest

from minillm.engine import Tensor
from minillm.engine import tensor as engine_tensor
from minillm.engine.tensor import _freed_graph, _unbroadcast
from minillm import exercises
from minillm.exercises import ch02, use
from exercise_helpers import stub, outputs


# --- 2.1 (build) the backward walk ---------------------------------------------------------------


def backpropagate(root, grad, retain_graph=False, order_of=None, unbroadcast=True, free=True,
                  grads_everywhere=False):
    """The walk, written as a learner would; the keyword arguments switch on plausible mistakes."""
    order = (order_of or depth_first)(root)
    collected = {id(root): grad}
    for node in reversed(order):
        g = collected.pop(id(node), None)
        if g is None:
            continue
        if node.is_leaf:
            node.grad = np.array(g, dtype=node.dtype) if node.grad is None else node.grad + g
            continue
        if grads_everywhere:
            node.grad = g
        for parent, contribution in zip(node._parents, node._backward(g)):
            if contribution is None or not parent.requires_grad:
                continue
            if unbroadcast:
                contribution = _unbroadcast(contribution, parent.shape)
            contribution = contribution.astype(parent.dtype, copy=False)
            collected[id(parent)] = collected[id(parent)] + contribution if id(parent) in collected else contribution
        if free and not retain_graph:
            node._backward, node._parents = _freed_graph, ()


def depth_first(root):
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        node, ready = stack.pop()
        if ready:
            order.append(node)
        elif id(node) not in visited:
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if p.requires_grad)
    return order


def breadth_first_reversed(root):  # nodes nearest the output first: not a topological order
    order, visited, queue = [], {id(root)}, deque([root])
    while queue:
        node = queue.popleft()
        order.append(node)
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in visited:
                visited.add(id(parent))
                queue.append(parent)
    return order[::-1]


def recursive(root):  # the section 3 sketch, recursion and all
    order, visited = [], set()

    def visit(node):
        if id(node) not in visited:
            visited.add(id(node))
            for parent in node._parents:
                if parent.requires_grad:
                    visit(parent)
            order.append(node)
    visit(root)
    return order


def test_backpropagate_check(capsys):
    ch02.check_backpropagate(backpropagate)
    ch02.check_backpropagate(stub)
    ch02.check_backpropagate(lambda *a: backpropagate(*a, order_of=breadth_first_reversed))
    ch02.check_backpropagate(lambda *a: backpropagate(*a, unbroadcast=False))
    ch02.check_backpropagate(lambda *a: backpropagate(*a, free=False))
    ch02.check_backpropagate(lambda *a: backpropagate(*a, order_of=recursive))
    passed, stubbed, breadth_first, unbroadcast, never_frees, recursion = outputs(capsys)
    assert passed == "Exercise 2.1 (the backward walk): passed ✓"
    assert stubbed.startswith("Exercise 2.1 (the backward walk): not attempted yet")
    assert breadth_first.startswith("Exercise 2.1 (the backward walk): not yet ✗ - case 2: a value used on two paths "
                                    "(y = a·tanh(a), a = exp(x)): x.grad: first mismatch at index (0,)")
    assert unbroadcast == ("Exercise 2.1 (the backward walk): not yet ✗ - case 1: the neuron tanh(w·x + b): b.grad: "
                           "expected shape (), got shape (3,)")
    assert never_frees.startswith("Exercise 2.1 (the backward walk): not yet ✗ - case 7: two walks without "
                                  "retain_graph: on walk 2 (retain_graph=False) torch's raised RuntimeError, "
                                  "yours completed")
    assert recursion.startswith("Exercise 2.1 (the backward walk): not yet ✗ - case 9: your code raised "
                                "RecursionError")


def test_backpropagate_check_flags_grads_on_non_leaves(capsys):
    ch02.check_backpropagate(lambda *a: backpropagate(*a, grads_everywhere=True))
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 2.1 (the backward walk): not yet ✗ - case 1: the neuron")
    assert "so its .grad should stay None (as in torch)" in line


def test_backpropagate_second_hint_level(capsys, monkeypatch):
    monkeypatch.setattr(exercises, "_failures", {})  # count this test's failed runs only
    wrong = lambda *a: backpropagate(*a, order_of=breadth_first_reversed)  # noqa: E731
    ch02.check_backpropagate(wrong)
    assert "more:" not in capsys.readouterr().out
    ch02.check_backpropagate(wrong)
    assert "more: first list the nodes depth-first" in capsys.readouterr().out


def test_backpropagate_plugged_in_matches_torch(capsys):
    with use(backpropagate=backpropagate):
        assert engine_tensor.backpropagate is backpropagate
        assert ch02.end_to_end_backpropagate()
    assert capsys.readouterr().out == ("residual MLP gradients with your backward walk match torch.autograd "
                                       "(float64, |Δ| ≤ 1e-10): ✓\n")


def test_wrong_walk_plugged_in_fails_end_to_end(capsys):
    with use(backpropagate=lambda *a: backpropagate(*a, order_of=breadth_first_reversed)):
        assert not ch02.end_to_end_backpropagate()
    out = capsys.readouterr().out
    assert out.startswith("residual MLP gradients with your backward walk match torch.autograd (float64, "
                          "|Δ| ≤ 1e-10): ✗ - ")
    assert "grad: first mismatch at index" in out


def test_stub_plugged_in_is_skipped(capsys):
    with use(backpropagate=stub):
        ch02.end_to_end_backpropagate()
    assert capsys.readouterr().out.startswith("plug-in skipped: your backpropagate (exercise 2.1) is not written yet")


def _reference_gradients():
    x = Tensor(np.random.default_rng(5).normal(size=(4, 3)), requires_grad=True)
    ((x.tanh() * x).sum() + x.exp().mean()).backward()
    return x.grad


def test_plug_in_leaves_the_engine_unchanged():
    original = engine_tensor.backpropagate
    before = _reference_gradients()
    with use(backpropagate=lambda *a: backpropagate(*a, order_of=breadth_first_reversed)):
        assert engine_tensor.backpropagate is not original
    assert engine_tensor.backpropagate is original
    with pytest.raises(ZeroDivisionError):
        with use(backpropagate=backpropagate):
            1 / 0
    assert engine_tensor.backpropagate is original
    after = _reference_gradients()
    assert before.tobytes() == after.tobytes()


# --- 2.2 tanh backward ----------------------------------------------------------------------------


def tanh_backward(x, grad_out):
    return grad_out * (1 - np.tanh(x) ** 2)


def test_tanh_backward_check(capsys):
    ch02.check_tanh_backward(tanh_backward)
    ch02.check_tanh_backward(stub)
    ch02.check_tanh_backward(lambda x, grad_out: grad_out * (1 - x**2))  # differentiated x, not tanh(x)
    ch02.check_tanh_backward(lambda x, grad_out: 1 - np.tanh(x) ** 2)  # the local gradient alone
    passed, stubbed, squared_x, local_only = outputs(capsys)
    assert passed == "Exercise 2.2 (tanh backward): passed ✓"
    assert stubbed.startswith("Exercise 2.2 (tanh backward): not attempted yet")
    for wrong in (squared_x, local_only):
        assert wrong.startswith("Exercise 2.2 (tanh backward): not yet ✗ - case 1: gradient for x of shape (5,): "
                                "first mismatch at index (0,)")


# --- 2.3 matmul backward --------------------------------------------------------------------------


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
    assert passed == "Exercise 2.3 (matmul backward): passed ✓"
    assert "not attempted yet" in stubbed
    assert unsummed == ("Exercise 2.3 (matmul backward): not yet ✗ - case 4: grad_b for a (2, 3, 4) @ b (4, 5): "
                        "expected shape (4, 5), got shape (2, 4, 5)")
    assert untransposed.startswith("Exercise 2.3 (matmul backward): not yet ✗ - case 1: your code raised ValueError")
    assert a_list.endswith("case 1: expected a tuple (grad_a, grad_b), got list")


# --- 2.4 softmax backward -------------------------------------------------------------------------


def softmax_backward(y, grad_out):
    return y * (grad_out - (grad_out * y).sum(axis=-1, keepdims=True))


def test_softmax_backward_check(capsys):
    ch02.check_softmax_backward(softmax_backward)
    ch02.check_softmax_backward(stub)
    ch02.check_softmax_backward(lambda y, grad_out: y * (1 - y) * grad_out)  # the Jacobian's diagonal only
    ch02.check_softmax_backward(lambda y, grad_out: y * (grad_out - grad_out.sum(axis=-1, keepdims=True)))
    passed, stubbed, diagonal, unweighted = outputs(capsys)
    assert passed == "Exercise 2.4 (softmax backward): passed ✓"
    assert "not attempted yet" in stubbed
    for wrong in (diagonal, unweighted):
        assert wrong.startswith("Exercise 2.4 (softmax backward): not yet ✗ - case 1: gradient for x of shape (5,): "
                                "first mismatch at index (0,)")


# --- 2.5 softplus as an engine op -----------------------------------------------------------------


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
    assert passed == "Exercise 2.5 (softplus op): passed ✓"
    assert "not attempted yet" in stubbed
    assert overflow == ("Exercise 2.5 (softplus op): not yet ✗ - case 3: softplus(x) for x of shape (5,): "
                        "first mismatch at index (4,): expected 800, got inf")
    assert no_graph.startswith("Exercise 2.5 (softplus op): not yet ✗ - case 1: softplus(x) for x of shape (6,) "
                               "recorded no graph")
    assert wrong_backward.startswith("Exercise 2.5 (softplus op): not yet ✗ - case 1: gradient for x of shape (6,): "
                                     "first mismatch at index (0,)")
    assert an_array.endswith("case 1: softplus should return a minillm Tensor, got ndarray")


# --- 2.6 MLP backward by hand --------------------------------------------------------------------


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
    assert passed == "Exercise 2.6 (MLP backward by hand): passed ✓"
    assert "not attempted yet" in stubbed
    assert wrong_slope.startswith("Exercise 2.6 (MLP backward by hand): not yet ✗ - case 1: gradient for x "
                                  "(x (4, 3), hidden size 5, output size 2): first mismatch at index (0, 0)")
    assert unsummed == ("Exercise 2.6 (MLP backward by hand): not yet ✗ - case 1: gradient for b1 (x (4, 3), "
                        "hidden size 5, output size 2): expected shape (5,), got shape (4, 5)")
    assert four.endswith("case 1: expected a tuple of 5 gradients (x, w1, b1, w2, b2), got tuple of length 4")
