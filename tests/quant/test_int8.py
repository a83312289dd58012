"""minillm.quant.int8 against torch's fake quantization and bitsandbytes' LLM.int8() on CPU.

Absmax and zero-point round trips are compared with `torch.fake_quantize_per_tensor_affine` and
`torch.fake_quantize_per_channel_affine` (bit for bit) and checked against their error bound. The LLM.int8()
parts are compared with bitsandbytes run here: `int8_vectorwise_quant`, `int8_linear_matmul`,
`int8_mm_dequant`, and `Linear8bitLt(has_fp16_weights=False)` in eval and train mode, all `torch.equal`.
"""

import itertools

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_F
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minillm.quant import (Int8Linear, absmax_dequantize, absmax_quantize, int8_linear_matmul, int8_mm_dequant,
                           int8_vectorwise_dequant, int8_vectorwise_quant, zeropoint_dequantize,
                           zeropoint_quantize)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, scale=1.0, seed=0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def with_outlier_columns(x, cols=(1, 3), factor=8.0):
    """Plant the "emergent features" of LLM.int8(): a few input dimensions far larger than the rest."""
    x = x.clone()
    x[..., list(cols)] *= factor
    return x


def assert_equal(ours, theirs, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, \
        f"{what}: got {ours.dtype} {tuple(ours.shape)}, bitsandbytes {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        diff = (ours.double() - theirs.double()).abs()
        pytest.fail(f"{what}: {int((ours != theirs).sum())} of {ours.numel()} differ, max |Δ| {diff.max():.3g}")


# ------------------------------------------------------------------------------ absmax and zero-point
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_absmax_roundtrip_equals_torch_fake_quantize(dim, dtype):
    x = randn(7, 33, scale=3, dtype=dtype)
    codes, scale = absmax_quantize(x, dim)
    ours = absmax_dequantize(codes, scale)
    x32 = x.float()  # torch's fake quantization of the exact fp32 upcast
    if dim is None:
        theirs = torch.fake_quantize_per_tensor_affine(x32, scale, torch.tensor(0, dtype=torch.int32), -127, 127)
    else:
        axis = 1 - dim % 2  # the dimension that keeps one scale per index
        theirs = torch.fake_quantize_per_channel_affine(x32, scale.view(-1), torch.zeros(x.shape[axis],
                                                        dtype=torch.int32), axis, -127, 127)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127, "the absmax itself must get code ±127"
    assert_equal(ours, theirs, f"absmax dim={dim} {dtype} (multiply by 1/scale, as torch does)")


@pytest.mark.parametrize("dim", [None, 0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zeropoint_roundtrip_equals_torch_fake_quantize(dim, dtype):
    x = (randn(9, 17, scale=2, seed=1) + 1.5).to(dtype)  # shifted: asymmetric is the point
    codes, scale, zero_point = zeropoint_quantize(x, dim)
    ours = zeropoint_dequantize(codes, scale, zero_point)
    if dim is None:
        theirs = torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, -128, 127)
    else:
        theirs = torch.fake_quantize_per_channel_affine(x.float(), scale.view(-1), zero_point.view(-1), 1 - dim,
                                                        -128, 127)
    assert zero_point.dtype == torch.int32 and int(codes.min()) == -128, "the minimum must get code -128"
    assert_equal(ours, theirs, f"zero-point dim={dim} {dtype}")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), log_scale=st.floats(-4, 4), shift=st.floats(-3, 3),
       per_row=st.booleans(), seed=st.integers(0, 2**16))
def test_roundtrip_error_bounds(rows, cols, log_scale, shift, per_row, seed):
    """Rounding to the nearest step costs at most half a step: |x - x̂| <= scale / 2 (plus fp32 rounding)."""
    x = (randn(rows, cols, seed=seed) + shift) * 10**log_scale
    dim = -1 if per_row else None
    codes, scale = absmax_quantize(x, dim)
    error = (x - absmax_dequantize(codes, scale)).abs()
    assert bool((error <= scale * (0.5 + 1e-4)).all()), f"absmax error {float(error.max()):.3g} > scale / 2"

    codes, scale, zero_point = zeropoint_quantize(x, dim)
    error = (x - zeropoint_dequantize(codes, scale, zero_point)).abs()
    assert bool((error <= scale * (0.5 + 1e-4)).all()), f"zero-point error {float(error.max()):.3g} > scale / 2"
    zeros = torch.zeros_like(x)
    zeros[..., ::2] = x[..., ::2]  # half the entries exactly 0
    codes, scale, zero_point = zeropoint_quantize(zeros, dim)
    assert bool((zeropoint_dequantize(codes, scale, zero_point)[..., 1::2] == 0).all()), "0 must stay exactly 0"


def test_asymmetric_beats_symmetric_on_one_sided_data():
    """All-positive data wastes the negative half of absmax's codes; the zero point uses all 256."""
    x = randn(64, 64, seed=2).abs()
    absmax_error = (x - absmax_dequantize(*absmax_quantize(x))).abs().mean()
    zeropoint_error = (x - zeropoint_dequantize(*zeropoint_quantize(x))).abs().mean()
    assert zeropoint_error < 0.6 * absmax_error


def test_all_zero_tensor():
    x = torch.zeros(3, 4)
    codes, scale = absmax_quantize(x, dim=1)
    assert torch.equal(absmax_dequantize(codes, scale), x) and not bool(codes.any())
    assert torch.equal(zeropoint_dequantize(*zeropoint_quantize(x)), x)


# ---------------------------------------------------------------------------- int8_vectorwise_quant
@pytest.mark.parametrize("threshold", [0.0, 1.5, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (64, 100)])
def test_vectorwise_quant_equals_bitsandbytes(shape, dtype, threshold):
    x = with_outlier_columns(randn(*shape, scale=2, seed=shape[0], dtype=dtype))
    if shape[0] > 2:
        x[2] = 0  # an all-zero row: absmax 0, codes 0
    before = x.clone()
    codes, row_absmax, outlier_cols = int8_vectorwise_quant(x, threshold)
    assert torch.equal(x, before), "int8_vectorwise_quant must not modify its input"
    bnb_codes, bnb_absmax, bnb_cols = bnb_F.int8_vectorwise_quant(x.clone(), threshold)
    what = f"{shape} {dtype} threshold {threshold}"
    assert_equal(codes, bnb_codes, f"codes, {what}")
    assert_equal(row_absmax, bnb_absmax, f"row absmax, {what} (outliers are left out of it)")
    assert_equal(outlier_cols, torch.empty(0, dtype=torch.int64) if bnb_cols is None else bnb_cols,
                 f"outlier columns, {what}")
    if threshold == 6.0:
        assert outlier_cols.numel() > 0, "the planted outlier columns should be found at threshold 6"


def test_vectorwise_dequant_equals_bitsandbytes():
    codes, row_absmax, _ = int8_vectorwise_quant(randn(17, 40, scale=3))
    assert_equal(int8_vectorwise_dequant(codes, row_absmax), bnb_F.int8_vectorwise_dequant(codes, row_absmax),
                 "int8_vectorwise_dequant (absmax first, then 1/127)")


# ------------------------------------------------------------------------------------ int8 matmul
@pytest.mark.parametrize("M, N, K", [(1, 1, 1), (3, 5, 7), (17, 9, 130), (8, 16, 1040), (8, 16, 4096)])
def test_int8_matmul_and_dequant_equal_bitsandbytes(M, N, K):
    g = torch.Generator().manual_seed(K)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    acc = int8_linear_matmul(a, b)
    assert_equal(acc, (a.long() @ b.long().t()).int(), "int8_linear_matmul vs exact int64 matmul")
    # bitsandbytes runs torch._int_mm (exact) only where torch reports AVX512; elsewhere an fp32 matmul, exact in
    # any summation order only while every partial sum stays below 2^24, which K <= 1040 guarantees (1040 * 127^2).
    if K <= 1040:
        assert_equal(acc, bnb_F.int8_linear_matmul(a, b), "int8_linear_matmul")

    row_absmax, col_absmax = torch.rand(M, generator=g) * 4, torch.rand(N, generator=g) * 4
    bias = torch.randn(N, generator=g)
    assert_equal(int8_mm_dequant(acc, row_absmax, col_absmax, bias.half()),
                 bnb_F.int8_mm_dequant(acc, row_absmax, col_absmax, bias=bias.half()), "int8_mm_dequant fp16")
    for dtype in DTYPES:  # the op under bitsandbytes' fp16-only wrapper takes a dtype
        theirs = torch.ops.bitsandbytes.int8_mm_dequant(acc, row_absmax, col_absmax, dtype=dtype, bias=bias.to(dtype))
        assert_equal(int8_mm_dequant(acc, row_absmax, col_absmax, bias.to(dtype), dtype=dtype), theirs,
                     f"int8_mm_dequant {dtype}")


def test_int8_matmul_worst_case_is_exact():
    """K = 16384 products of 127 * 127: an fp32 accumulator would round; int32 is exact."""
    a = torch.full((1, 16384), 127, dtype=torch.int8)
    assert int(int8_linear_matmul(a, a)) == 16384 * 127 * 127


def test_dequant_constant_is_bitsandbytes_not_one_over_127_squared():
    """bitsandbytes' CPU constant 6.200124e-05 is not 1/127² = 6.2000124e-05; the true value differs from it."""
    acc = int8_linear_matmul(*(torch.randint(-127, 128, (16, 64), dtype=torch.int8) for _ in range(2)))
    row_absmax, col_absmax = torch.rand(16) + 0.5, torch.rand(16) + 0.5
    theirs = torch.ops.bitsandbytes.int8_mm_dequant(acc, row_absmax, col_absmax, dtype=torch.float32)
    exact = (acc * (row_absmax[:, None] * col_absmax[None, :]) / 127**2)
    assert_equal(int8_mm_dequant(acc, row_absmax, col_absmax, dtype=torch.float32), theirs, "fp32 dequant")
    assert not torch.equal(exact, theirs), "with 1/127**2 the outputs would not match bitsandbytes"


# --------------------------------------------------------------------------------------- Int8Linear
def bnb_layer(linear: nn.Linear, threshold: float) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes the weight


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_linear_equals_bitsandbytes(dtype, threshold, train):
    torch.manual_seed(0)
    for shape, bias in [((9, 64), True), ((2, 5, 64), False), ((1, 64), True)]:
        linear = nn.Linear(64, 48, bias=bias)
        ours, theirs = Int8Linear.from_linear(linear, threshold=threshold), bnb_layer(linear, threshold)
        ours.train(train), theirs.train(train)
        x = with_outlier_columns(randn(*shape, scale=1.5, seed=shape[0]), cols=(3, 40)).to(dtype)
        with torch.no_grad():
            assert_equal(ours(x), theirs(x.clone()), f"Int8Linear {'train' if train else 'eval'} {dtype} "
                         f"threshold {threshold} input {shape} bias {bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_linear_train_mode_input_gradient_equals_bitsandbytes(dtype):
    linear = nn.Linear(64, 48)
    ours, theirs = Int8Linear.from_linear(linear), bnb_layer(linear, 6.0)
    x = randn(2, 5, 64, scale=2, dtype=dtype)
    grad_out = randn(2, 5, 48, seed=1, dtype=dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x_ours).backward(grad_out)
    theirs(x_theirs).backward(grad_out)
    assert_equal(x_ours.grad, x_theirs.grad, f"d loss / d x in train mode, {dtype}")


def test_outlier_decomposition_recovers_accuracy():
    """The LLM.int8() lesson: large feature dimensions wreck int8 rows; multiplying them in 16-bit saves it."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    x = with_outlier_columns(randn(32, 256, seed=4), cols=(7, 70, 150, 200), factor=30.0)
    exact = linear(x).detach()

    def relative_error(threshold):
        layer = Int8Linear.from_linear(linear, threshold=threshold).eval()
        return float((layer(x) - exact).norm() / exact.norm())

    plain, decomposed = relative_error(0.0), relative_error(6.0)
    assert decomposed < plain / 3, f"threshold 6: {decomposed:.2e}, no decomposition: {plain:.2e}"


def test_int8_linear_module_basics():
    layer = Int8Linear.from_linear(nn.Linear(10, 4, bias=False), threshold=3.0)
    assert (layer.in_features, layer.out_features, layer.bias) == (10, 4, None)
    assert set(layer.state_dict()) == {"weight_codes", "weight_absmax"}
    assert "threshold=3.0" in repr(layer)
    assert layer.weight_codes.dtype == torch.int8 and layer.weight_codes.shape == (4, 10)


# ------------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    with pytest.raises(ValueError, match="must be 2-D"):
        int8_vectorwise_quant(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="empty"):
        int8_vectorwise_quant(torch.empty(0, 4))
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        int8_vectorwise_quant(torch.randn(2, 4), threshold=-1.0)
    with pytest.raises(TypeError, match="dtype must be one of"):
        absmax_quantize(torch.arange(6))
    with pytest.raises(ValueError, match=r"dim must be None .* \[-2, 2\)"):
        absmax_quantize(torch.randn(2, 3), dim=2)
    with pytest.raises(ValueError, match="dim must be None"):
        zeropoint_quantize(torch.randn(2, 3), dim="rows")
    with pytest.raises(ValueError, match=r"a \(M, K\) and b \(N, K\), got a \(2, 3\) and b \(2, 4\)"):
        int8_linear_matmul(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="torch.int8"):
        int8_linear_matmul(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="int32"):
        int8_mm_dequant(torch.zeros(2, 2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"needs row_absmax \(2,\) and col_absmax \(3,\)"):
        int8_mm_dequant(torch.zeros(2, 3, dtype=torch.int32), torch.ones(3), torch.ones(3))


def test_int8_linear_bad_inputs():
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(3, 4, 1))
    with pytest.raises(ValueError, match="expected a 2-D tensor"):
        Int8Linear(torch.zeros(2, 3, 4, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match=r"fp32 of shape \(2,\)"):
        Int8Linear(torch.zeros(2, 3, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        Int8Linear.from_linear(nn.Linear(3, 2), threshold="6")
    layer = Int8Linear.from_linear(nn.Linear(8, 4)).eval()
    with pytest.raises(ValueError, match=r"input of shape \(2, 7\) does not fit weight \(4, 8\)"):
        layer(torch.randn(2, 7))
    with pytest.raises(ValueError, match="empty"):
        layer(torch.randn(0, 8))


def test_grid_of_awkward_shapes_runs_in_both_modes():
    """Odd feature counts and 1-D / 4-D inputs (bitsandbytes only reshapes 2-D and 3-D ones)."""
    for (n_in, n_out), lead in itertools.product([(1, 1), (7, 3), (33, 65)], [(), (5,), (2, 3, 2)]):
        layer = Int8Linear.from_linear(nn.Linear(n_in, n_out))
        x = randn(*lead, n_in, scale=4)
        for train in (True, False):
            assert layer.train(train)(x).shape == (*lead, n_out)
