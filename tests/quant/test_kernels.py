"""minillm.quant.kernels (chapter 13's Triton kernels) against bitsandbytes, minillm.quant and torch.

Without a GPU the kernels run in Triton's interpreter (minillm.quant.kernels sets TRITON_INTERPRET=1 itself);
with one they are compiled and every test here runs on CUDA unchanged. Expected values come from references
run inside each test, on the CPU:

- 4-bit dequantization: bitsandbytes' `dequantize_4bit` on its correct paths (its pure-torch
  `_dequantize_4bit_compute` for every shape; its public function for shapes its AVX512 C kernel gets right,
  see test_nf4.py) and `minillm.quant.dequantize_4bit`, `torch.equal` and sign bits included;
- int8 dequantization: `q.float() * scale` rounded once, and `Int8Linear.dequantized_weight`;
- fused 4-bit matmul: every output within the rounding-error bound of an fp32 dot product (Higham §3.1) of
  the float64 product on the dequantized weight; a bound, because no two kernels (ours, MKL's, OpenBLAS's on
  another CPU) need sum in the same order;
- int8 matmul: the exact int32 product computed by torch, scaled in the same order.

Sizes are small (the interpreter pays 1-2 ms per program); tests that need many programs shrink the block
sizes with monkeypatch instead of growing the tensors.
"""

import dataclasses
import itertools

import bitsandbytes.functional as bnb_F
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from minillm.quant import kernels
from minillm.quant.int8 import Int8Linear, absmax_dequantize, absmax_quantize
from minillm.quant.kernels import dequant, matmul
from minillm.quant.nf4 import QUANT_TYPES, dequantize_4bit, quantize_4bit
from quant_samples import sample

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cpu" if kernels.INTERPRETED else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd counts (1, 7, 1665), ragged last blocks, rows that are not a multiple of the blocksize (96, 333, 65),
# a last dimension that is (64 * 3) and a 1-D tensor longer than one block.
SHAPES = [(1,), (7,), (3, 96), (5, 333), (2, 3, 65), (4, 192), (1000,)]
bnb_dequantize_4bit_torch = _dequantize_4bit_compute.__wrapped__  # bitsandbytes' pure-torch path, uncompiled


def on_device(packed, state):
    """The packed bytes and every tensor of the QuantState moved to DEVICE (a no-op in the interpreter)."""
    moved = {f.name: getattr(state, f.name).to(DEVICE) for f in dataclasses.fields(state)
             if isinstance(getattr(state, f.name), torch.Tensor)}
    return packed.to(DEVICE), dataclasses.replace(state, **moved)


def bnb_dequantize(packed, state, dtype=None):
    """bitsandbytes' pure-torch dequantize_4bit, the absmax first undone as its `dequantize_4bit` does."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    return bnb_dequantize_4bit_torch(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape,
                                     dtype or state.dtype)


def assert_equal(ours, theirs, what):
    ours = ours.cpu()
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, \
        f"{what}: got {ours.dtype} {tuple(ours.shape)}, expected {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        i = (ours != theirs).nonzero()[0].tolist()
        pytest.fail(f"{what}: {int((ours != theirs).sum())} of {ours.numel()} differ; first at {i}: "
                    f"kernel {ours[tuple(i)].item()}, reference {theirs[tuple(i)].item()}")
    if ours.is_floating_point() and not torch.equal(ours.signbit(), theirs.signbit()):
        pytest.fail(f"{what}: equal values but some zeros differ in sign (+0 vs -0); multiply the code value "
                    "by the absmax as the reference does, and take FP4's code 8 from the table (+0)")


# ------------------------------------------------------------------------------------------- 4-bit dequant
@pytest.mark.parametrize("quant_type,dtype,nested", list(itertools.product(QUANT_TYPES, DTYPES, [False, True])),
                         ids=lambda v: str(v).removeprefix("torch."))
def test_dequantize_4bit_equals_bitsandbytes_and_minillm(quant_type, dtype, nested):
    for seed, shape in enumerate(SHAPES):
        x = sample(shape, dtype, seed)
        where = f"{quant_type} {dtype} nested={nested} shape={shape}"
        packed, state = quantize_4bit(x, 64, quant_type, nested)
        bnb_packed, bnb_state = bnb_F.quantize_4bit(x, blocksize=64, quant_type=quant_type,
                                                    compress_statistics=nested)
        ours = kernels.dequantize_4bit(*on_device(packed, state))
        assert_equal(ours, bnb_dequantize(bnb_packed, bnb_state), f"vs bitsandbytes (pure torch), {where}")
        assert_equal(ours, dequantize_4bit(packed, state), f"vs minillm.quant.dequantize_4bit, {where}")
        if shape[-1] % 64 == 0:  # its default CPU path: a C kernel, right here (and no torch.compile)
            expected = bnb_F.dequantize_4bit(bnb_packed, bnb_state)
            assert torch.equal(ours.cpu(), expected), f"vs bitsandbytes.functional.dequantize_4bit, {where}"


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_4bit_out_dtype_rounds_once(out_dtype):
    # An fp32 weight dequantized straight to 16 bits, as Linear4bit does: code * absmax in fp32, rounded once.
    x = sample((6, 130), torch.float32, 1)
    for quant_type, nested in itertools.product(QUANT_TYPES, [False, True]):
        packed, state = quantize_4bit(x, 64, quant_type, nested)
        bnb_packed, bnb_state = bnb_F.quantize_4bit(x, blocksize=64, quant_type=quant_type,
                                                    compress_statistics=nested)
        ours = kernels.dequantize_4bit(*on_device(packed, state), out_dtype=out_dtype)
        where = f"{quant_type} nested={nested} out_dtype={out_dtype}"
        assert_equal(ours, bnb_dequantize(bnb_packed, bnb_state, out_dtype), f"vs bitsandbytes, {where}")
        assert_equal(ours, dequantize_4bit(packed, state, out_dtype), f"vs minillm.quant, {where}")


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_dequantize_4bit_other_blocksizes(blocksize):
    x = sample((5, 333), torch.bfloat16, blocksize)
    for nested in (False, True):
        packed, state = quantize_4bit(x, blocksize, "nf4", nested)
        assert_equal(kernels.dequantize_4bit(*on_device(packed, state)), dequantize_4bit(packed, state),
                     f"blocksize {blocksize}, nested={nested}")


def test_dequantize_4bit_many_programs_and_masks(monkeypatch):
    # 16 bytes per program: 1665 values need 53 programs; the last one is partly masked and ends on the
    # padding nibble of the odd count; 7 blocks of 256 absmax codes exercise the nested index.
    monkeypatch.setattr(dequant, "BLOCK_4BIT", 16)
    x = sample((5, 333), torch.float16, 3)
    for nested in (False, True):
        packed, state = quantize_4bit(x, 32, "nf4", nested)
        assert_equal(kernels.dequantize_4bit(*on_device(packed, state)), dequantize_4bit(packed, state),
                     f"BLOCK 16, nested={nested}")
    x = sample((70000,), torch.float32, 4)  # 2188 blocks of 32: nine nested blocks of 256
    packed, state = quantize_4bit(x, 32, "fp4", True)
    monkeypatch.setattr(dequant, "BLOCK_4BIT", 8192)
    assert_equal(kernels.dequantize_4bit(*on_device(packed, state)), dequantize_4bit(packed, state),
                 "70000 values, BLOCK 8192, nested")


def test_bf16_output_is_rounded_not_truncated():
    # Values whose fp32 -> bf16 rounding differs from truncation: the interpreter's own cast would fail this.
    x = torch.tensor([1.0, 1.00390625 + 2**-9, -(1.0 + 3 * 2**-9), 0.3])  # absmax 1.0 block
    packed, state = quantize_4bit(x, 32, "nf4")
    expected = dequantize_4bit(packed, state, torch.float32)
    assert not torch.equal(expected.to(torch.bfloat16), expected.view(torch.int32).bitwise_and(-65536)
                           .view(torch.float32).to(torch.bfloat16)), "the sample must contain a value that rounds up"
    assert_equal(kernels.dequantize_4bit(*on_device(packed, state), out_dtype=torch.bfloat16),
                 expected.to(torch.bfloat16), "bf16 output: round to nearest even, not truncation")


# ------------------------------------------------------------------------------------------- int8 dequant
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_int8_equals_torch(out_dtype, monkeypatch):
    w = sample((37, 300), torch.float32, 5)
    q, scale = absmax_quantize(w, dim=-1)  # (37, 300) int8, (37, 1) fp32
    expected = (q.float() * scale).to(out_dtype)
    assert_equal(kernels.dequantize_int8(q.to(DEVICE), scale.to(DEVICE), out_dtype), expected, "one program")
    if out_dtype == torch.float32:
        assert_equal(kernels.dequantize_int8(q.to(DEVICE), scale.to(DEVICE)), absmax_dequantize(q, scale),
                     "vs absmax_dequantize")
    monkeypatch.setattr(dequant, "BLOCK_INT8", (8, 64))  # 5 x 5 programs, ragged in both directions
    assert_equal(kernels.dequantize_int8(q.to(DEVICE), scale.view(-1).to(DEVICE), out_dtype), expected,
                 "(8, 64) tiles, (rows,) scale")
    q_t = q.t().contiguous().t()  # same values, column-major strides
    assert_equal(kernels.dequantize_int8(q_t.to(DEVICE), scale.to(DEVICE), out_dtype), expected,
                 "column-major q: use the strides, not row * cols")


def test_dequantize_int8_equals_llm_int8_weight():
    # LLM.int8()'s absmax / 127 is the row step; the result is bitsandbytes' train-mode weight (test_int8.py).
    layer = Int8Linear.from_linear(torch.nn.Linear(130, 24))
    step = layer.weight_absmax * (1 / 127)
    for dtype in DTYPES:
        assert_equal(kernels.dequantize_int8(layer.weight_codes.to(DEVICE), step.to(DEVICE), dtype),
                     layer.dequantized_weight(dtype), f"Int8Linear.dequantized_weight({dtype})")


# ------------------------------------------------------------------------------------------- 4-bit matmul
def gamma(n: int, u: float) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of n roundings in a row, unit roundoff u (Higham §3.1)."""
    return n * u / (1 - n * u)


def assert_within_dot_product_bound(ours, x, weight, what):
    """Every output of `ours` (x @ weight.T computed with an fp32 accumulator) within its rounding-error bound.

    A length-K dot product with unit roundoff u, summed in any order (a Triton tile, MKL, OpenBLAS, FMA or
    not), is within γ_K(u) · Σ_k |x_k w_k| of the exact one (Higham, Accuracy and Stability of Numerical
    Algorithms, §3.1): the issue's c · K · u · Σ|x·w| with c = 1 / (1 − K·u), 1.0001 here. u = 2^-24 for an fp32
    accumulator; 2^-23 (c doubled) on a GPU's 16-bit tensor cores, which may truncate as they add (Fasi et
    al., "Numerical behavior of NVIDIA tensor cores", 2021). A 16-bit output is the fp32 sum rounded once more:
    at most half an ulp, u_out · |out| (u_out = 2^-8 bf16, 2^-11 fp16; half the subnormal step below the
    normal range). The float64 reference and Σ|x·w| add γ_K(2^-53) · Σ|x·w| each.
    """
    K = x.shape[-1]
    xd, wd = x.double(), weight.double()
    exact = xd @ wd.T  # (..., N)
    magnitude = xd.abs() @ wd.abs().T  # (..., N) Σ_k |x_k w_k|
    u_acc = 2.0**-24 if x.dtype == torch.float32 or kernels.INTERPRETED else 2.0**-23
    bound = (gamma(K, u_acc) + 2 * gamma(K, 2.0**-53)) * magnitude
    ours = ours.cpu()
    if ours.dtype != torch.float32:
        finfo = torch.finfo(ours.dtype)
        bound = bound + finfo.eps / 2 * ours.double().abs().clamp(min=finfo.smallest_normal)
    error = (ours.double() - exact).abs()
    if not (error <= bound).all():
        i = (error / bound).argmax()
        pytest.fail(f"{what}: {int((error > bound).sum())} of {error.numel()} outputs outside the fp32 dot-product "
                    f"bound γ_K Σ|x·w| (K = {K}, u = {u_acc:.3g}){' + half an ulp' * (ours.dtype != torch.float32)}"
                    f"; worst |error| {error.flatten()[i]:.3g} vs bound {bound.flatten()[i]:.3g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_4bit_within_the_dot_product_error_bound(dtype):
    # The bound holds by construction for any summation order, so it is the same verdict on every CPU and GPU;
    # comparing with F.linear's error is not (MKL's blocking differs with the vector ISA, and on one AVX-512
    # CPU F.linear was the more accurate of the two). The weight is the dequantized one in x's dtype: the
    # kernel must round W exactly as dequantize_4bit(..., x.dtype) does before multiplying.
    g = torch.Generator().manual_seed(6)
    for quant_type, nested, (M, N, K) in [("nf4", False, (16, 96, 512)), ("nf4", True, (5, 33, 129)),
                                          ("fp4", True, (17, 40, 320))]:
        w = torch.randn(N, K, generator=g)
        x = torch.randn(M, K, generator=g).to(dtype)
        packed, state = quantize_4bit(w, 64, quant_type, nested)
        ours = kernels.matmul_4bit(x.to(DEVICE), *on_device(packed, state))
        assert ours.dtype == x.dtype and ours.shape == (M, N), \
            f"matmul_4bit: got {ours.dtype} {tuple(ours.shape)}, expected {x.dtype} {(M, N)}"
        assert_within_dot_product_bound(ours, x, dequantize_4bit(packed, state, x.dtype),
                                        f"{quant_type} nested={nested} x ({M}, {K}) @ W ({N}, {K}).T in {dtype}; "
                                        "accumulate in fp32 and round the weight to x's dtype before tl.dot")


def test_matmul_4bit_batched_input_and_many_tiles(monkeypatch):
    # x (2, 3, K): leading dimensions are flattened and restored. Small tiles: 1 x 3 programs, 3 K steps each;
    # K = 129 makes W's rows start mid-byte and mid-block.
    monkeypatch.setattr(matmul, "tile_sizes", lambda m, n, k, min_k=16: (16, 16, 64))
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 129, generator=g)
    x = torch.randn(2, 3, 129, generator=g)
    packed, state = quantize_4bit(w, 64, "nf4", True)
    ours = kernels.matmul_4bit(x.to(DEVICE), *on_device(packed, state)).cpu()
    assert ours.shape == (2, 3, 40), f"matmul_4bit must return x.shape[:-1] + (N,), got {tuple(ours.shape)}"
    assert_within_dot_product_bound(ours, x, dequantize_4bit(packed, state),
                                    "16x16x64 tiles: check the masks on m, n and k and the flat index n*K + k")


def test_matmul_4bit_gradient_is_that_of_f_linear():
    # QLoRA backpropagates through the frozen 4-bit layer to the LoRA weights before it: dL/dx = grad @ W.
    g = torch.Generator().manual_seed(10)
    packed, state = quantize_4bit(torch.randn(24, 96, generator=g), 64, "nf4", True)
    x = torch.randn(2, 5, 96, generator=g)
    grad_out = torch.randn(2, 5, 24, generator=g)
    x_ours = x.clone().to(DEVICE).requires_grad_()
    kernels.matmul_4bit(x_ours, *on_device(packed, state)).backward(grad_out.to(DEVICE))
    x_ref = x.clone().requires_grad_()
    F.linear(x_ref, dequantize_4bit(packed, state)).backward(grad_out)
    assert_equal(x_ours.grad, x_ref.grad, "d(matmul_4bit)/dx: backward must return grad_out @ W")


# -------------------------------------------------------------------------------------------- int8 matmul
def test_matmul_int8_accumulates_exactly_in_int32(monkeypatch):
    # Sums of up to 2100 * 127 * 127 = 3.4e7 > 2**24: an fp32 accumulator would lose the low bits.
    g = torch.Generator().manual_seed(8)
    x_q = torch.randint(90, 128, (20, 2100), dtype=torch.int8, generator=g)
    w_q = torch.randint(-127, 128, (30, 2100), dtype=torch.int8, generator=g)
    w_q[:10] = torch.randint(100, 128, (10, 2100), dtype=torch.int8, generator=g)
    x_scale, w_scale = torch.rand(20, generator=g), torch.rand(30, generator=g)
    acc = x_q.int() @ w_q.int().T  # (20, 30), exact
    # The premise, shown with an fp32 accumulator whose order we fix (one product at a time, each add an IEEE
    # rounding, so the same on every CPU), not with torch's fp32 matmul, whose blocking varies by CPU.
    fp32_acc = torch.zeros(20, 30)
    for k in range(x_q.shape[1]):
        fp32_acc += x_q[:, k, None].float() * w_q[None, :, k].float()  # exact products (< 2**14)
    assert not torch.equal(fp32_acc.to(torch.int64), acc.to(torch.int64)), \
        "the sample must be one where fp32 accumulation is inexact"
    expected = acc.float() * x_scale[:, None] * w_scale[None, :]
    for tiles in [None, (16, 16, 32)]:
        if tiles:
            monkeypatch.setattr(matmul, "tile_sizes", lambda m, n, k, min_k=16: tiles)
        ours = kernels.matmul_int8(x_q.to(DEVICE), x_scale.to(DEVICE), w_q.to(DEVICE), w_scale.to(DEVICE)[:, None])
        assert_equal(ours, expected, f"matmul_int8 with tiles {tiles or 'chosen by the launcher'}")


def test_matmul_int8_with_absmax_quantize():
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(7, 65, generator=g), torch.randn(19, 65, generator=g)
    (x_q, x_scale), (w_q, w_scale) = absmax_quantize(x, dim=-1), absmax_quantize(w, dim=-1)
    ours = kernels.matmul_int8(*(t.to(DEVICE) for t in (x_q, x_scale, w_q, w_scale)))
    expected = (x_q.int() @ w_q.int().T).float() * x_scale * w_scale.T
    assert_equal(ours, expected, "matmul_int8 on absmax_quantize's codes and (rows, 1) scales")
    torch.testing.assert_close(ours.cpu(), x @ w.T, rtol=0.05, atol=0.3, msg="int8 product should approximate x @ w.T")


# ------------------------------------------------------------------------------------------------- errors
def test_launchers_reject_bad_inputs():
    packed, state = quantize_4bit(torch.randn(8, 64), 64, "nf4")
    packed, state = on_device(packed, state)
    x = torch.randn(3, 64, device=DEVICE)
    q, scale = (t.to(DEVICE) for t in absmax_quantize(torch.randn(4, 8), dim=-1))
    cases = [
        (TypeError, "packed must have dtype torch.uint8",
         lambda: kernels.dequantize_4bit(packed.to(torch.int8), state)),
        (ValueError, "packs into 256 bytes", lambda: kernels.dequantize_4bit(packed[:-1], state)),
        (TypeError, "state must be the minillm.quant.QuantState", lambda: kernels.dequantize_4bit(packed, {})),
        (ValueError, "blocksize must be one of", lambda: kernels.dequantize_4bit(
            packed, dataclasses.replace(state, blocksize=48))),
        (ValueError, "out_dtype must be one of", lambda: kernels.dequantize_4bit(packed, state, torch.float64)),
        (ValueError, "need a (8,) torch.float32 absmax", lambda: kernels.dequantize_4bit(
            packed, dataclasses.replace(state, absmax=state.absmax[:4]))),
        (ValueError, "all tensors must be on one device", lambda: kernels.dequantize_4bit(
            packed, dataclasses.replace(state, absmax=state.absmax.to("meta")))),
        (TypeError, "q must have dtype torch.int8", lambda: kernels.dequantize_int8(q.float(), scale)),
        (ValueError, "row_scale of shape (4,) or (4, 1), got (8,)", lambda: kernels.dequantize_int8(
            q, torch.ones(8, device=DEVICE))),
        (ValueError, "q must be 2-D", lambda: kernels.dequantize_int8(q[0], scale)),
        (ValueError, "x @ W.T needs x (..., 64) for W (8, 64), got x (3, 65)", lambda: kernels.matmul_4bit(
            torch.randn(3, 65, device=DEVICE), packed, state)),
        (TypeError, "x must have dtype", lambda: kernels.matmul_4bit(x.double(), packed, state)),
        (ValueError, "must be 2-D (out_features, in_features)", lambda: kernels.matmul_4bit(
            x, packed, dataclasses.replace(state, shape=torch.Size([512])))),
        (ValueError, "x_q @ w_q.T needs x_q (M, K) and w_q (N, K), got x_q (4, 8) and w_q (4, 7)",
         lambda: kernels.matmul_int8(q, scale, q[:, :7], scale)),
        (ValueError, "w_scale must hold one scale per row, shape (4,) or (4, 1), got (1, 4)",
         lambda: kernels.matmul_int8(q, scale, q, scale.T)),
        (TypeError, "x_scale must have dtype torch.float32", lambda: kernels.matmul_int8(q, scale.half(), q, scale)),
    ]
    for error, message, call in cases:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), f"expected a {error.__name__} saying {message!r}, got {info.value!r}"
