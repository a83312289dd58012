"""Autograd: every op's backward against central differences (no reference library needed), then the
semantics of torch.autograd that the engine copies: accumulation into leaves, freed graphs, no_grad,
non-scalar outputs, shared subexpressions and detach."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.engine import Tensor, is_grad_enabled, no_grad
from minillm.engine import functional as F
from strategies import FUNCTIONAL_CASES, TENSOR_CASES, gradcheck


@pytest.mark.parametrize("case", TENSOR_CASES + FUNCTIONAL_CASES, ids=lambda c: c.name)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_gradient_matches_central_differences(case, data):
    inputs, params = data.draw(case.inputs)
    gradcheck(lambda *xs: case.ours(*xs, **params), inputs, name=f"{case.name}{params}")


def test_gradcheck_of_dropout_with_a_fixed_mask():
    x = np.random.default_rng(0).standard_normal((3, 4))
    gradcheck(lambda t: F.dropout(t, p=0.4, generator=np.random.default_rng(1)), [x], name="dropout")


def test_gradcheck_notices_a_wrong_backward():
    """The checker itself must fail on a broken op, or every test above proves nothing."""
    def wrong_square(x):
        return Tensor._op(x.data**2, (x,), lambda g: (g * x.data,), "wrong_square")  # missing factor 2

    with pytest.raises(AssertionError, match="central differences"):
        gradcheck(wrong_square, [np.array([1.0, 2.0])])


# ---- a small shared graph used by the semantic tests -------------------------------------------------

X0 = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])


def leaves():
    return Tensor(X0.copy(), requires_grad=True), torch.tensor(X0, requires_grad=True)


def loss_of(x):
    """Uses x twice and saves intermediate values, like any real network."""
    return (x * x.tanh()).sum() + x.exp().mean()


def test_leaf_gradients_accumulate_across_backward_calls():
    x, tx = leaves()
    loss_of(x).backward()
    loss_of(x).backward()
    loss_of(tx).backward()
    loss_of(tx).backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12,
                               err_msg="a second backward must add to .grad, not replace it")


def test_second_backward_through_a_freed_graph_raises():
    for make in (lambda: leaves()[1], lambda: leaves()[0]):
        loss = loss_of(make())
        loss.backward()
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            loss.backward()


def test_retain_graph_allows_a_second_backward_that_accumulates():
    x, tx = leaves()
    loss, ref = loss_of(x), loss_of(tx)
    loss.backward(retain_graph=True)
    loss.backward()
    ref.backward(retain_graph=True)
    ref.backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12)


def test_no_grad_records_nothing_and_restores_the_mode():
    x, _ = leaves()
    with no_grad():
        assert not is_grad_enabled()
        y = loss_of(x)
    assert is_grad_enabled()
    assert not y.requires_grad and y.is_leaf, "ops under no_grad must not build a graph"
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    with pytest.raises(ZeroDivisionError), no_grad():
        1 / 0
    assert is_grad_enabled(), "an exception inside no_grad must still restore grad mode"


def test_no_grad_works_as_a_decorator():
    @no_grad()
    def evaluate(x):
        return loss_of(x)

    assert not evaluate(leaves()[0]).requires_grad


def test_non_scalar_backward_needs_an_explicit_grad():
    x, tx = leaves()
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        (tx * 2).backward()
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        (x * 2).backward()
    upstream = np.arange(6.0).reshape(2, 3)
    (x.exp() * 2).backward(upstream)
    (tx.exp() * 2).backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"grad shape \(3,\) does not match tensor shape \(2, 3\)"):
        (x * 2).backward(np.ones(3))


def test_diamond_graph_sums_both_paths():
    """a feeds b and c, which meet again: a's gradient must be complete before a's backward runs."""
    def diamond(x):
        a = x * 2
        b, c = a.exp(), a.tanh()
        return (b * c + a).sum()

    x, tx = leaves()
    diamond(x).backward()
    diamond(tx).backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12)


def test_detach_cuts_the_graph():
    x, tx = leaves()
    (x * x.detach()).sum().backward()
    (tx * tx.detach()).sum().backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12, err_msg="no gradient flows through detach()")
    assert not x.detach().requires_grad and x.detach().data is x.data


def test_only_leaves_that_require_grad_keep_grad():
    x, tx = leaves()
    constant = Tensor(X0.copy())
    hidden, ref_hidden = x * constant, tx * torch.tensor(X0)
    hidden.sum().backward()
    ref_hidden.sum().backward()
    assert constant.grad is None
    assert hidden.grad is None and ref_hidden.is_leaf is False, "non-leaf tensors do not keep .grad (as torch)"
    assert x.grad is not None


def test_leaf_grads_do_not_alias_each_other():
    """add's backward hands the same array to both parents; each leaf must still own its .grad."""
    a, b = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    (a + b).sum().backward()
    a.grad *= 10
    np.testing.assert_array_equal(b.grad, np.ones(3), err_msg="b.grad changed when a.grad was edited in place")


def test_a_long_chain_does_not_hit_the_recursion_limit():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y + x
    y.backward()
    assert x.grad == 5001.0
