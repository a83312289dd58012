"""minillm.engine.functional against torch.nn.functional: values and gradients on random inputs, then
cross_entropy's ignore_index, numerical stability with huge logits, dropout's randomness and scaling,
and the errors bad input must raise."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.engine import Tensor, manual_seed
from minillm.engine import functional as F
from strategies import FUNCTIONAL_CASES, assert_keeps_float32, assert_matches_torch


@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=lambda c: c.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_function_matches_torch(case, data):
    inputs, params = data.draw(case.inputs)
    assert_matches_torch(case, inputs, params)


@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=lambda c: c.name)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_function_keeps_float32(case, data):
    inputs, params = data.draw(case.inputs)
    assert_keeps_float32(case, inputs, params)


def both(array, dtype=np.float64):
    """The same values as an engine leaf and a torch leaf."""
    array = np.asarray(array, dtype=dtype)
    return Tensor(array.copy(), requires_grad=True), torch.tensor(array, requires_grad=True)


def assert_same_value_and_grad(out, ref, x, tx, rtol=1e-10):
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=rtol, atol=1e-12)
    upstream = np.random.default_rng(0).standard_normal(out.shape).astype(out.dtype)
    out.backward(upstream)
    ref.backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=rtol, atol=1e-12)


# ---- cross_entropy -----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_skips_ignored_rows_like_torch(reduction, ignore_index):
    logits = np.random.default_rng(0).standard_normal((6, 4))
    targets = np.array([2, -100, 1, 2, 0, 3]) if ignore_index == -100 else np.array([2, 0, 1, 2, 3, 2])
    x, tx = both(logits)
    out = F.cross_entropy(x, Tensor(targets), ignore_index=ignore_index, reduction=reduction)
    ref = TF.cross_entropy(tx, torch.from_numpy(targets), ignore_index=ignore_index, reduction=reduction)
    assert_same_value_and_grad(out, ref, x, tx)


def test_cross_entropy_with_every_row_ignored_is_nan_with_zero_gradient_like_torch():
    x, tx = both(np.ones((3, 4)))
    targets = np.full(3, -100)
    out, ref = F.cross_entropy(x, targets), TF.cross_entropy(tx, torch.from_numpy(targets))
    assert np.isnan(out.item()) and np.isnan(ref.item())
    out.backward()
    ref.backward()
    np.testing.assert_array_equal(x.grad, tx.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "cross_entropy"])
def test_huge_logits_stay_finite(name, dtype):
    """exp(1000) overflows even float64; subtracting the row max first is what keeps these finite."""
    logits = np.random.default_rng(0).standard_normal((4, 6)) * 1000 + 1000
    x, tx = both(logits, dtype)
    targets = np.array([0, 5, 2, 3])
    if name == "cross_entropy":
        out, ref = F.cross_entropy(x, targets), TF.cross_entropy(tx, torch.from_numpy(targets))
    else:
        out, ref = getattr(F, name)(x, dim=-1), getattr(TF, name)(tx, dim=-1)
    assert np.isfinite(out.data).all(), f"{name} overflowed on logits around 1000"
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    assert_same_value_and_grad(out, ref, x, tx, rtol=rtol)
    assert np.isfinite(x.grad).all()


def test_softmax_of_a_causal_mask_with_minus_infinity_matches_torch():
    scores = np.random.default_rng(0).standard_normal((2, 4, 4))
    future = np.triu(np.ones((4, 4), dtype=bool), k=1)
    x, tx = both(scores)
    out = F.softmax(x.masked_fill(future, float("-inf")), dim=-1)
    ref = TF.softmax(tx.masked_fill(torch.from_numpy(future), float("-inf")), dim=-1)
    assert (out.data[:, future] == 0).all(), "masked positions must get exactly zero probability"
    assert_same_value_and_grad(out, ref, x, tx)


# ---- dropout -----------------------------------------------------------------------------------------

def test_dropout_is_repeatable_with_a_seeded_generator():
    x = Tensor(np.ones((8, 8)))
    first = F.dropout(x, 0.5, generator=np.random.default_rng(7)).data
    again = F.dropout(x, 0.5, generator=np.random.default_rng(7)).data
    other = F.dropout(x, 0.5, generator=np.random.default_rng(8)).data
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other), "a different seed should drop different elements"


def test_dropout_default_generator_follows_manual_seed():
    x = Tensor(np.ones((8, 8)))
    manual_seed(3)
    first = F.dropout(x, 0.5).data
    manual_seed(3)
    np.testing.assert_array_equal(F.dropout(x, 0.5).data, first)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_zeroes_some_scales_the_rest_and_keeps_the_mean(p):
    array = np.random.default_rng(0).uniform(1.0, 2.0, size=200_000).astype(np.float32)
    x = Tensor(array, requires_grad=True)
    out = F.dropout(x, p, generator=np.random.default_rng(0))
    kept = out.data != 0
    np.testing.assert_allclose(out.data[kept], array[kept] / (1 - p), rtol=1e-6,
                               err_msg="survivors must be scaled by 1/(1-p) (inverted dropout)")
    assert abs(1 - kept.mean() - p) < 0.01, f"dropped fraction {1 - kept.mean():.3f}, expected about {p}"
    assert abs(out.data.mean() / array.mean() - 1) < 0.02, "inverted dropout keeps the expected value"
    assert out.dtype == np.float32
    out.sum().backward()
    np.testing.assert_allclose(x.grad, kept / (1 - p), rtol=1e-6,
                               err_msg="the gradient flows only through kept elements, with the same scale")


def test_dropout_identities_and_p_one():
    x = Tensor(np.ones(5), requires_grad=True)
    assert F.dropout(x, 0.0) is x and F.dropout(x, 0.7, training=False) is x
    out, ref = F.dropout(x, 1.0), TF.dropout(torch.ones(5), 1.0)
    np.testing.assert_array_equal(out.data, ref.numpy())


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_rejects_a_bad_probability(p):
    with pytest.raises(ValueError):
        TF.dropout(torch.ones(3), p)
    with pytest.raises(ValueError, match="probability p must be between 0 and 1"):
        F.dropout(Tensor(np.ones(3)), p)


# ---- bad input ---------------------------------------------------------------------------------------

def test_cross_entropy_out_of_range_target_names_the_index_and_the_class_count():
    with pytest.raises(IndexError):
        TF.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))  # torch refuses too
    with pytest.raises(ValueError, match=r"target 3 \(row 1\) is out of range for 3 classes; allowed 0\.\.2"):
        F.cross_entropy(Tensor(np.zeros((2, 3))), np.array([0, 3]))
    with pytest.raises(ValueError, match="target -1"):
        F.cross_entropy(Tensor(np.zeros((2, 3))), np.array([-1, 0]))


def test_cross_entropy_rejects_bad_shapes_dtypes_and_reductions():
    logits = Tensor(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="targets must be integer class indices"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"logits shape \(2, 3\) needs targets of shape \(2,\), got \(3,\)"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\), got \(2, 3, 4\)"):
        F.cross_entropy(Tensor(np.zeros((2, 3, 4))), np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction must be"):
        F.cross_entropy(logits, np.array([0, 1]), reduction="avg")


def test_embedding_rejects_out_of_range_and_non_integer_ids():
    weight = Tensor(np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"embedding: id 5 is out of range for 5 embeddings \(allowed 0\.\.4\)"):
        F.embedding(np.array([1, 5]), weight)
    with pytest.raises(ValueError, match="id -1"):
        F.embedding(np.array([-1]), weight)
    with pytest.raises(TypeError, match="ids must be integers"):
        F.embedding(np.array([1.0]), weight)


def test_linear_and_layer_norm_name_the_mismatched_shapes():
    with pytest.raises(ValueError, match=r"linear: input shape \(2, 3\) and weight shape \(4, 5\) are not aligned"):
        F.linear(Tensor(np.zeros((2, 3))), Tensor(np.zeros((4, 5))))
    with pytest.raises(ValueError, match=r"linear: bias shape \(3,\) must be \(4,\)"):
        F.linear(Tensor(np.zeros((2, 5))), Tensor(np.zeros((4, 5))), Tensor(np.zeros(3)))
    with pytest.raises(ValueError, match=r"layer_norm: input shape \(2, 3\) does not end with normalized_shape \(4,\)"):
        F.layer_norm(Tensor(np.zeros((2, 3))), 4)
    with pytest.raises(ValueError, match=r"layer_norm: weight shape \(2,\) must equal normalized_shape \(3,\)"):
        F.layer_norm(Tensor(np.zeros((2, 3))), 3, weight=Tensor(np.ones(2)))


def test_softmax_dim_out_of_range():
    with pytest.raises(IndexError, match="softmax: dim 2 is out of range"):
        F.softmax(Tensor(np.zeros((2, 3))), dim=2)
