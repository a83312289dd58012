"""minillm.quant.blockwise against bitsandbytes' 8-bit blockwise dynamic quantization on CPU.

Every expected value comes from bitsandbytes run here: the dynamic maps, and codes, absmax and dequantized
outputs (`torch.equal`, signed zeros included) over blocksizes 64...4096, fp32/fp16/bf16 and shapes with
odd element counts and ragged last blocks.
"""

import itertools

import bitsandbytes.functional as bnb_F
import pytest
import torch

from minillm.quant import create_dynamic_map, dequantize_blockwise, quantize_blockwise
from minillm.quant.blockwise import BLOCKSIZES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (63,), (3, 333), (4097,), (2, 3, 65)]  # odd counts; ragged last blocks for every blocksize


def sample(kind: str, shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":  # a few large values, so blocks get very different absmax
        x = torch.randn(shape, generator=g)
        x.view(-1)[:: 97] *= 20
    elif kind == "adam-v":  # tiny positive values over many decades, as in Adam's second moment
        x = torch.rand(shape, generator=g) ** 6 * 1e-3
    else:  # "zeros": all-zero blocks, plus one non-zero value near the end of the larger tensors
        x = torch.zeros(shape)
        if x.numel() > 100:
            x.view(-1)[-3] = -2.5
    return x.to(dtype)


def bnb_roundtrip(x, blocksize, code=None):
    kwargs = {} if code is None else {"code": code.clone()}
    codes, state = bnb_F.quantize_blockwise(x, blocksize=blocksize, **kwargs)
    return codes, state.absmax, bnb_F.dequantize_blockwise(codes, state)


def assert_equal(ours, theirs, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, \
        f"{what}: got {ours.dtype} {tuple(ours.shape)}, bitsandbytes {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        i = (ours != theirs).nonzero()[0].tolist()
        pytest.fail(f"{what}: {int((ours != theirs).sum())} of {ours.numel()} differ; first at {i}: "
                    f"ours {ours[tuple(i)].item()}, bitsandbytes {theirs[tuple(i)].item()}")


# ------------------------------------------------------------------------------------- dynamic map
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours, theirs = create_dynamic_map(signed), bnb_F.create_dynamic_map(signed=signed)
    assert_equal(ours, theirs, f"create_dynamic_map(signed={signed}) (build it in fp32, as bitsandbytes does)")


def test_dynamic_map_shape():
    code = create_dynamic_map()
    assert code.shape == (256,) and bool((code[1:] > code[:-1]).all()), "256 distinct sorted values expected"
    assert code[-1] == 1.0 and 0.0 in code and -1.0 < code[0] < -0.99, "the signed map holds 0 and 1 but not -1"
    assert bool((create_dynamic_map(signed=False) >= 0).all()), "the unsigned map has no negative values"


# -------------------------------------------------------------------------------- bit-exact grid
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_dequantize_equal_bitsandbytes(blocksize, dtype):
    for (i, shape), kind in itertools.product(enumerate(SHAPES), ["randn", "zeros"]):
        x = sample(kind, shape, dtype, seed=i)
        what = f"{kind} {shape} {dtype} blocksize {blocksize}"
        codes, absmax = quantize_blockwise(x, blocksize=blocksize)
        bnb_codes, bnb_absmax, bnb_out = bnb_roundtrip(x, blocksize)
        assert_equal(codes, bnb_codes, f"codes, {what} (snap onto the 65536-point grid before the lookup)")
        assert_equal(absmax, bnb_absmax, f"absmax, {what}")
        out = dequantize_blockwise(codes, absmax, blocksize=blocksize, dtype=dtype)
        assert_equal(out, bnb_out, f"dequantized, {what}")
        assert torch.equal(out.signbit(), bnb_out.signbit()), f"signs of zeros differ, {what}"


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_unsigned_map_equals_bitsandbytes(blocksize):
    code = create_dynamic_map(signed=False)
    for i, shape in enumerate(SHAPES):
        x = sample("adam-v", shape, torch.float32, seed=i)
        codes, absmax = quantize_blockwise(x, code=code, blocksize=blocksize)
        bnb_codes, bnb_absmax, bnb_out = bnb_roundtrip(x, blocksize, code)
        assert_equal(codes, bnb_codes, f"unsigned-map codes, {shape} blocksize {blocksize}")
        assert_equal(absmax, bnb_absmax, f"unsigned-map absmax, {shape}")
        assert_equal(dequantize_blockwise(codes, absmax, code=code, blocksize=blocksize), bnb_out,
                     f"unsigned-map dequantized, {shape}")


def test_codes_are_not_always_the_nearest_entry():
    """bitsandbytes' CPU kernel picks the entry nearest to a grid point, not to the value (module docstring).

    A true nearest-entry search gives different codes for a few values; ours match bitsandbytes instead and
    stay within two entries of the nearest one.
    """
    x = torch.randn(256 * 800, generator=torch.Generator().manual_seed(0))
    code = create_dynamic_map()
    codes, absmax = quantize_blockwise(x, blocksize=256)
    scaled = x.view(-1, 256) / absmax[:, None]
    nearest = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).view(-1)
    differ = codes.long() != nearest
    assert 0 < int(differ.sum()) < 0.01 * x.numel(), f"{int(differ.sum())} codes differ from the nearest entry"
    assert int((codes.long() - nearest).abs().max()) <= 2
    assert_equal(codes, bnb_F.quantize_blockwise(x, blocksize=256)[0], "codes of 204 800 normal values")


# ----------------------------------------------------------------------------------- properties
def test_roundtrip_error_bound():
    """Each value is off by at most half the widest gap of the map (plus one grid step), times its absmax."""
    x = sample("randn", (5, 1001), torch.float32, seed=3)
    code = create_dynamic_map()
    codes, absmax = quantize_blockwise(x, blocksize=128)
    out = dequantize_blockwise(codes, absmax, blocksize=128)
    bound = ((code[1:] - code[:-1]).max() / 2 + 2 / 65535) * absmax.repeat_interleave(128)[: x.numel()]
    excess = (x.reshape(-1) - out.reshape(-1)).abs() - bound
    assert float(excess.max()) <= 0, f"error exceeds the bound by {float(excess.max()):.3g}"


def test_half_precision_input_gets_the_codes_of_its_fp32_upcast():
    x = sample("randn", (3, 333), torch.bfloat16, seed=1)
    assert torch.equal(quantize_blockwise(x, blocksize=64)[0], quantize_blockwise(x.float(), blocksize=64)[0])


def test_input_is_not_modified():
    x = sample("randn", (4097,), torch.float16, seed=2)
    before = x.clone()
    quantize_blockwise(x, blocksize=64)
    assert torch.equal(x, before), "quantize_blockwise must not write into its input"


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("blocksize", [32, 100, 8192, 0, -64, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two from 64 to 4096"):
        quantize_blockwise(torch.randn(100), blocksize=blocksize)
    codes = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="power of two from 64 to 4096"):
        dequantize_blockwise(codes, torch.ones(1), blocksize=blocksize)


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        quantize_blockwise(torch.empty(0, 3))
    with pytest.raises(TypeError, match="dtype must be one of"):
        quantize_blockwise(torch.arange(10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_blockwise([1.0, 2.0])
    with pytest.raises(ValueError, match=r"code must be a \(256,\) float32"):
        quantize_blockwise(torch.randn(10), code=torch.linspace(-1, 1, 16))
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise(torch.randn(10), code=create_dynamic_map().flip(0))
    with pytest.raises(TypeError, match="signed must be True or False"):
        create_dynamic_map(signed="yes")


def test_bad_dequantize_inputs():
    codes, absmax = quantize_blockwise(torch.randn(300), blocksize=64)  # 5 blocks
    with pytest.raises(ValueError, match=r"need an fp32 absmax of shape \(3,\).*blocksize used to quantize"):
        dequantize_blockwise(codes, absmax, blocksize=128)
    with pytest.raises(TypeError, match="torch.uint8"):
        dequantize_blockwise(codes.to(torch.int8), absmax, blocksize=64)
    with pytest.raises(ValueError, match="dtype must be one of"):
        dequantize_blockwise(codes, absmax, blocksize=64, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty"):
        dequantize_blockwise(codes[:0], absmax[:0], blocksize=64)
