"""minillm.engine.Tensor against torch: every op's value and gradients on random shapes and broadcast
pairs (the table in strategies.py), then the details a learner trips on: dtypes, indexing with repeats,
where the gradient of max goes, and the error messages for bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.engine import Tensor, cat, stack, where
from strategies import TENSOR_CASES, assert_keeps_float32, assert_matches_torch


@pytest.mark.parametrize("case", TENSOR_CASES, ids=lambda c: c.name)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_op_matches_torch(case, data):
    inputs, params = data.draw(case.inputs)
    assert_matches_torch(case, inputs, params)


@pytest.mark.parametrize("case", TENSOR_CASES, ids=lambda c: c.name)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_op_keeps_float32(case, data):
    inputs, params = data.draw(case.inputs)
    assert_keeps_float32(case, inputs, params)


# ---- construction and dtypes -------------------------------------------------------------------------

def test_python_numbers_get_torch_default_dtypes():
    for value in ([1.0, 2.0], 1.5, [[1, 2.5]]):
        assert Tensor(value).dtype == torch.tensor(value).numpy().dtype == np.float32
    assert Tensor([1, 2]).dtype == torch.tensor([1, 2]).numpy().dtype == np.int64
    assert Tensor([True, False]).dtype == np.bool_


def test_numpy_arrays_keep_their_dtype_and_memory():
    for dtype in (np.float32, np.float64, np.int32, np.int64, np.bool_):
        array = np.zeros(3, dtype=dtype)
        t = Tensor(array)
        assert t.dtype == dtype
        assert t.data is array, "Tensor(array) should wrap the array, not copy it"


@pytest.mark.parametrize("dtype", [np.float16, np.complex64, np.uint8, np.str_])
def test_unsupported_dtype_is_a_type_error_listing_the_allowed_ones(dtype):
    with pytest.raises(TypeError, match=r"allowed dtypes: float32, float64, int32, int64, bool"):
        Tensor(np.zeros(2, dtype=dtype))


def test_only_float_tensors_can_require_grad():
    with pytest.raises(RuntimeError):
        torch.tensor([1, 2], requires_grad=True)  # the reference refuses too (with a RuntimeError)
    with pytest.raises(TypeError, match="only float32/float64"):
        Tensor([1, 2], requires_grad=True)


def test_mixed_precision_gives_each_input_a_gradient_of_its_own_dtype():
    a32, b64 = np.ones(3, np.float32), np.full(3, 2.0)
    a, b = Tensor(a32, requires_grad=True), Tensor(b64, requires_grad=True)
    ta, tb = torch.tensor(a32, requires_grad=True), torch.tensor(b64, requires_grad=True)
    out, ref = a * b, ta * tb
    assert out.dtype == ref.detach().numpy().dtype == np.float64
    out.sum().backward()
    ref.sum().backward()
    assert a.grad.dtype == ta.grad.numpy().dtype == np.float32
    assert b.grad.dtype == tb.grad.numpy().dtype == np.float64


def test_attributes_mirror_torch():
    array = np.arange(6.0).reshape(2, 3)
    t, ref = Tensor(array, requires_grad=True), torch.tensor(array, requires_grad=True)
    assert t.shape == tuple(ref.shape) and t.ndim == ref.ndim and len(t) == len(ref)
    assert t.is_leaf and ref.is_leaf and not (t * 2).is_leaf
    assert t.T.shape == tuple(ref.T.shape)
    assert Tensor(3.5).item() == torch.tensor(3.5).item()
    assert t.numpy() is array
    assert "requires_grad=True" in repr(t) and "dtype=float64" in repr(t)
    assert repr(Tensor([1.0, 2.0])) == "tensor([1., 2.])"
    with pytest.raises(TypeError, match="0-d"):
        len(Tensor(1.0))


def test_numpy_array_on_the_left_hands_over_to_the_tensor():
    x = Tensor(np.ones(3), requires_grad=True)
    for out in (np.full(3, 2.0) + x, np.full(3, 2.0) * x, np.full(3, 2.0) - x, np.full(3, 2.0) / x,
                np.eye(3) @ x):
        assert isinstance(out, Tensor) and out.requires_grad, "numpy should defer to Tensor's reflected op"


# ---- indexing ----------------------------------------------------------------------------------------

def test_repeated_integer_indices_accumulate_gradient():
    x, tx = Tensor(np.arange(4.0), requires_grad=True), torch.arange(4.0, dtype=torch.float64, requires_grad=True)
    x[[0, 2, 0, 0]].sum().backward()
    tx[[0, 2, 0, 0]].sum().backward()
    np.testing.assert_array_equal(x.grad, tx.grad.numpy(),
                                  err_msg="each repeat of an index must add its gradient (np.add.at, not +=)")


def test_numpy_and_tensor_indices_agree():
    x = Tensor(np.arange(12.0).reshape(3, 4))
    index = np.array([2, 0])
    mask = x.data > 5
    np.testing.assert_array_equal(x[index].data, x[Tensor(index)].data)
    np.testing.assert_array_equal(x[mask].data, x[Tensor(mask)].data)
    np.testing.assert_array_equal(x[[2, 0], 1:].data, x.data[[2, 0], 1:])


def test_where_takes_python_numbers():
    cond = np.array([True, False, True])
    x, tx = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True), torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out, ref = where(Tensor(cond), x, 0.0), torch.where(torch.from_numpy(cond), tx, 0.0)
    np.testing.assert_array_equal(out.data, ref.detach().numpy())
    out.sum().backward()
    ref.sum().backward()
    np.testing.assert_array_equal(x.grad, tx.grad.numpy())


# ---- max -------------------------------------------------------------------------------------------

def test_max_over_a_dim_sends_the_gradient_to_the_arg_max_only():
    array = np.random.default_rng(0).standard_normal((3, 5))
    x = Tensor(array, requires_grad=True)
    x.max(dim=1).sum().backward()
    expected = np.zeros_like(array)
    expected[np.arange(3), array.argmax(axis=1)] = 1.0
    np.testing.assert_array_equal(x.grad, expected, err_msg="only the winning element gets the gradient")


def test_max_over_everything_shares_the_gradient_between_ties_like_torch():
    array = np.array([1.0, 3.0, 3.0, 0.0])
    x, tx = Tensor(array, requires_grad=True), torch.tensor(array, requires_grad=True)
    x.max().backward()
    tx.max().backward()
    np.testing.assert_array_equal(x.grad, tx.grad.numpy())


# ---- errors ------------------------------------------------------------------------------------------

def test_broadcast_error_names_the_op_and_both_shapes():
    a, b = Tensor(np.ones((2, 3))), Tensor(np.ones(4))
    for op, name in ((lambda: a + b, "add"), (lambda: a - b, "sub"), (lambda: a * b, "mul"), (lambda: a / b, "div")):
        with pytest.raises(ValueError, match=rf"{name}: shapes \(2, 3\) and \(4,\) cannot be broadcast"):
            op()


def test_matmul_error_names_both_shapes_and_the_mismatch():
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) are not aligned \(3 != 4\)"):
        Tensor(np.ones((2, 3))) @ Tensor(np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"matmul: batch dims of shapes \(2, 2, 3\) and \(3, 3, 4\)"):
        Tensor(np.ones((2, 2, 3))) @ Tensor(np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match="at least 1 dim"):
        Tensor(np.ones(3)) @ Tensor(2.0)


def test_shape_op_errors():
    x = Tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"reshape: cannot reshape a tensor of shape \(2, 3\) \(6 elements\)"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match=r"permute: dims \(0, 0\)"):
        x.permute(0, 0)
    with pytest.raises(ValueError, match=r"expand: shape \(2, 3\) cannot be expanded to \(2, 4\)"):
        x.expand(2, 4)
    with pytest.raises(ValueError, match=r"cat: shapes \(2, 3\), \(3, 2\) must match except in dim 0"):
        cat([x, Tensor(np.ones((3, 2)))])
    with pytest.raises(ValueError, match=r"stack: all tensors must have the same shape, got \(2, 3\), \(3,\)"):
        stack([x, Tensor(np.ones(3))])
    with pytest.raises(ValueError, match="non-empty"):
        cat([])


@pytest.mark.parametrize("op", ["sum", "mean", "var", "max", "transpose", "unsqueeze"])
def test_dim_out_of_range_is_an_index_error_like_torch(op):
    args = {"transpose": (0, 2), "unsqueeze": (3,)}.get(op, (2,))
    with pytest.raises(IndexError):
        getattr(torch.ones(2, 3), op)(*args)
    with pytest.raises(IndexError, match=rf"{op}: dim -?\d is out of range for a tensor with \d dims"):
        getattr(Tensor(np.ones((2, 3))), op)(*args)


def test_masked_fill_and_where_want_bool_masks_of_a_fitting_shape():
    x = Tensor(np.ones((2, 3)))
    with pytest.raises(TypeError, match="masked_fill: mask must be bool, got int64"):
        x.masked_fill(np.ones((2, 3), dtype=np.int64), 0.0)
    with pytest.raises(ValueError, match=r"mask shape \(4,\) cannot be broadcast to tensor shape \(2, 3\)"):
        x.masked_fill(np.ones(4, dtype=bool), 0.0)
    with pytest.raises(ValueError, match=r"mask shape \(2, 2, 3\) cannot be broadcast"):
        x.masked_fill(np.ones((2, 2, 3), dtype=bool), 0.0)  # would grow the tensor, torch refuses too
    with pytest.raises(TypeError, match="where: condition must be bool"):
        where(np.ones(3), x, x)


def test_pow_wants_a_python_number_exponent():
    with pytest.raises(TypeError, match="exponent must be a Python int or float"):
        Tensor(np.ones(2)) ** Tensor(np.ones(2))
