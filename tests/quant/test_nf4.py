"""minillm.quant.nf4 against bitsandbytes' 4-bit quantization (NF4, FP4, double quantization) on CPU.

Every expected value comes from bitsandbytes run here: the code tables, packed bytes, absmax, the nested state
of double quantization, and dequantized outputs (`torch.equal` plus equal sign bits) over NF4/FP4, every
blocksize 32...4096, fp32/fp16/bf16 and shapes with odd element counts and ragged last blocks.

Dequantized outputs are compared with bitsandbytes' pure-torch `_dequantize_4bit_compute`, called through
`__wrapped__`: bitsandbytes wraps it in `torch.compile`, which costs ~25 s per new shape on CPU and computes
the same values. Its default CPU `dequantize_4bit` is a C kernel that is wrong on some shapes on AVX512 CPUs;
`test_bitsandbytes_avx512_dequantize_bug` shows where.
"""

import itertools

import bitsandbytes.functional as bnb_F
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from minillm.quant.blockwise import create_dynamic_map
from minillm.quant.nf4 import (BLOCKSIZES_4BIT, QUANT_TYPES, QuantState, bits_per_parameter, create_fp4_code,
                               create_nf4_code, dequantize_4bit, get_4bit_code, pack_nibbles, quantize_4bit,
                               unpack_nibbles)
from quant_samples import sample

pytestmark = pytest.mark.usefixtures("one_thread")

bnb_dequantize_4bit_torch = _dequantize_4bit_compute.__wrapped__  # bitsandbytes' correct pure-torch path

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd counts (1, 7, 1665, 4097, 390), ragged last blocks for every blocksize, rows that are not a multiple of
# the blocksize (96, 333, 65), and exact multiples (64 * 64).
SHAPES = [(1,), (7,), (3, 96), (5, 333), (4097,), (2, 3, 65), (64, 64)]


def bnb_quantize(x, blocksize, quant_type, compress_statistics=False):
    return bnb_F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=compress_statistics)


def bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit through its pure-torch path (absmax first undone as it does it)."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    return bnb_dequantize_4bit_torch(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape,
                                     state.dtype)


def assert_equal(ours, theirs, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, \
        f"{what}: got {ours.dtype} {tuple(ours.shape)}, bitsandbytes {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        i = (ours != theirs).nonzero()[0].tolist()
        pytest.fail(f"{what}: {int((ours != theirs).sum())} of {ours.numel()} differ; first at {i}: "
                    f"ours {ours[tuple(i)].item()}, bitsandbytes {theirs[tuple(i)].item()}")
    if ours.is_floating_point() and not torch.equal(ours.signbit(), theirs.signbit()):
        pytest.fail(f"{what}: equal values but {int((ours.signbit() != theirs.signbit()).sum())} zeros differ "
                    "in sign (+0 vs -0); check FP4's code 8, which bitsandbytes stores as +0")


# ------------------------------------------------------------------------------------------- codes
def test_nf4_code_derived_from_normal_quantiles_equals_bitsandbytes():
    assert_equal(create_nf4_code(), bnb_F.get_4bit_type("nf4", device="cpu"),
                 "create_nf4_code (fp32 linspace of probabilities, float64 quantiles rounded to fp32, / max)")


def test_nf4_code_shape():
    code = create_nf4_code()
    assert code.shape == (16,) and bool((code[1:] > code[:-1]).all()), "NF4 is 16 distinct sorted values"
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0, "NF4 spans [-1, 1] with an exact 0 at index 7"


def test_fp4_code_equals_bitsandbytes():
    assert_equal(create_fp4_code(), bnb_F.get_4bit_type("fp4", device="cpu"),
                 "create_fp4_code (sign bit 3, exponent bits 2-1 counting down, mantissa bit 0, / 12)")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_get_4bit_code(quant_type):
    assert_equal(get_4bit_code(quant_type), bnb_F.get_4bit_type(quant_type, device="cpu"), "get_4bit_code")


# ----------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_nibble_order_matches_bitsandbytes(quant_type):
    # Quantizing the code's own values (absmax 1) gives each value's index; unpacking bitsandbytes' bytes
    # with our unpack_nibbles must give them back in order: element 2i is the high nibble.
    code = bnb_F.get_4bit_type(quant_type, device="cpu")
    packed, _ = bnb_quantize(code, 32, quant_type)
    expected = torch.arange(16, dtype=torch.uint8)
    if quant_type == "fp4":
        expected[8] = 0  # code 8 is also zero, and 0.0 is quantized to code 0
    assert_equal(unpack_nibbles(packed.reshape(-1)), expected, "unpack_nibbles of bitsandbytes' packed bytes")
    assert_equal(pack_nibbles(expected), packed.reshape(-1), "pack_nibbles (high nibble first)")


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (50,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert_equal(unpack_nibbles(pack_nibbles(codes)), codes, "unpack_nibbles(pack_nibbles(codes))")


# ------------------------------------------------------------------------- quantize / dequantize grid
@pytest.mark.parametrize("quant_type,blocksize,dtype,compress_statistics",
                         list(itertools.product(QUANT_TYPES, BLOCKSIZES_4BIT, DTYPES, [False, True])),
                         ids=lambda v: str(v).removeprefix("torch."))
def test_quantize_dequantize_equal_bitsandbytes(quant_type, blocksize, dtype, compress_statistics):
    for seed, shape in enumerate(SHAPES):
        x = sample(shape, dtype, seed)
        where = f"{quant_type} blocksize={blocksize} {dtype} shape={shape} compress_statistics={compress_statistics}"
        packed, state = quantize_4bit(x, blocksize, quant_type, compress_statistics)
        bnb_packed, bnb_state = bnb_quantize(x, blocksize, quant_type, compress_statistics)

        assert_equal(packed, bnb_packed, f"packed bytes, {where}")
        assert_equal(state.absmax, bnb_state.absmax, f"absmax, {where}")
        assert_equal(state.code, bnb_state.code, f"code, {where}")
        assert (state.shape, state.dtype, state.blocksize, state.quant_type) == \
            (bnb_state.shape, bnb_state.dtype, bnb_state.blocksize, bnb_state.quant_type), where
        assert state.nested == bnb_state.nested, f"nested should be {bnb_state.nested}, {where}"
        if compress_statistics:
            assert_equal(state.offset, bnb_state.offset, f"offset (absmax.mean()), {where}")
            assert_equal(state.nested_absmax, bnb_state.state2.absmax, f"nested absmax, {where}")
            assert_equal(state.nested_code, bnb_state.state2.code, f"nested code (dynamic map), {where}")
            assert state.nested_blocksize == bnb_state.state2.blocksize, where

        assert_equal(dequantize_4bit(packed, state), bnb_dequantize(bnb_packed, bnb_state), f"dequantized, {where}")


def test_dequantize_to_another_dtype_rounds_once():
    # Linear4bit dequantizes straight to its compute dtype: code * absmax in fp32, rounded once.
    x = sample((8, 128), torch.float32, 0)
    packed, state = quantize_4bit(x, 64, "nf4")
    bnb_packed, bnb_state = bnb_quantize(x, 64, "nf4")
    theirs = bnb_dequantize_4bit_torch(bnb_packed.reshape(-1), bnb_state.absmax, bnb_state.code, 64,
                                       bnb_state.shape, torch.bfloat16)
    assert_equal(dequantize_4bit(packed, state, dtype=torch.bfloat16), theirs, "dequantize_4bit(dtype=bf16)")


# ---------------------------------------------------------------------------------- rounding details
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_ties_go_to_the_lower_entry(quant_type):
    # Every fp32 midpoint between neighbouring code values, and the float just above it, in a block whose
    # absmax is 1 (so scaling is exact). bitsandbytes sends a midpoint down and the next float up.
    code = bnb_F.get_4bit_type(quant_type, device="cpu").sort().values
    midpoints = (code[:-1] + code[1:]) / 2  # (15,)
    above = torch.nextafter(midpoints, torch.tensor(2.0))  # (15,)
    x = torch.cat([torch.ones(1), midpoints, above, -torch.ones(1)])  # (32,)
    packed, _ = quantize_4bit(x, 32, quant_type)
    bnb_packed, _ = bnb_quantize(x, 32, quant_type)
    assert_equal(packed, bnb_packed, f"{quant_type} codes of values on and just above the midpoints")
    values = get_4bit_code(quant_type)[unpack_nibbles(packed.reshape(-1)).long()]  # (32,)
    assert torch.equal(values[1:16], code[:-1]) and torch.equal(values[16:31], code[1:]), \
        "a value on a midpoint must get the lower entry, one ulp above it the upper entry"


def test_fp4_zero_and_tiny_values_match_bitsandbytes():
    # FP4 has zero twice (codes 0 and 8): 0.0 and tiny negatives get code 0, tiny positives code 8.
    x = torch.tensor([1.0, 0.0, 1e-4, -1e-4, 2e-3, -2e-3, -0.0, 1e-30])
    packed, _ = quantize_4bit(x, 32, "fp4")
    bnb_packed, _ = bnb_quantize(x, 32, "fp4")
    assert_equal(packed, bnb_packed, "FP4 codes of zeros and tiny values")
    assert unpack_nibbles(bnb_packed.reshape(-1))[1:4].tolist() == [0, 8, 0], "bitsandbytes' FP4 zero codes changed"


def test_ragged_tail_divides_where_full_blocks_multiply():
    # bitsandbytes multiplies whole blocks by 1/absmax but divides the ragged last block by absmax. Find
    # values where the two differ in the last bit across a code midpoint, put them in both kinds of block,
    # and check that bitsandbytes, and we, give them different codes.
    absmax = torch.tensor(3.0)
    midpoints = (create_nf4_code()[:-1] + create_nf4_code()[1:]) / 2  # (15,)
    candidates = (midpoints[:, None] * absmax).flatten()  # (15,)
    for _ in range(4):  # the floats near midpoint * absmax, a few ulps either side
        candidates = torch.cat([candidates, torch.nextafter(candidates, torch.tensor(10.0)),
                                torch.nextafter(candidates, torch.tensor(-10.0))]).unique()
    straddles = torch.bucketize(candidates * (1 / absmax), midpoints) != torch.bucketize(candidates / absmax, midpoints)
    values = candidates[straddles][:31]
    assert values.numel() > 0, "no value found where x * (1/absmax) and x / absmax straddle an NF4 midpoint"
    block = torch.cat([absmax[None], values, torch.zeros(63 - values.numel())])  # (64,)
    x = torch.cat([block, block[:1 + values.numel()]])  # one full block, then a ragged one with the same values

    packed, _ = quantize_4bit(x, 64, "nf4")
    bnb_packed, _ = bnb_quantize(x, 64, "nf4")
    assert_equal(packed, bnb_packed, "codes of the same values in a full and in a ragged block")
    codes = unpack_nibbles(bnb_packed.reshape(-1))
    k = values.numel()
    assert not torch.equal(codes[1:1 + k], codes[65:65 + k]), \
        "bitsandbytes should code these values differently in a full block (x * (1/absmax)) and the tail (x / absmax)"


# --------------------------------------------------------------------------- bitsandbytes' own bug
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="bitsandbytes uses its buggy AVX512 4-bit dequantize only on CPUs with AVX512")
@pytest.mark.parametrize("shape,blocksize", [((3, 96), 64), ((2, 48), 32), ((64, 128), 1024)])
def test_bitsandbytes_avx512_dequantize_bug(shape, blocksize):
    # bitsandbytes' AVX512 kernel (last dimension a multiple of 16, blocksize < 2048) takes a value's block
    # to be row * (ncols // blocksize) + col // blocksize. When ncols is not a multiple of the blocksize and
    # the tensor has more than one block, that is the wrong block. We index blocks over the flat tensor.
    x = sample(shape, torch.float32, 0)
    packed, state = quantize_4bit(x, blocksize, "nf4")
    bnb_packed, bnb_state = bnb_quantize(x, blocksize, "nf4")
    ours, correct = dequantize_4bit(packed, state), bnb_dequantize(bnb_packed, bnb_state)
    buggy = bnb_F.dequantize_4bit(bnb_packed, bnb_state)
    assert_equal(ours, correct, f"dequantized {shape} blocksize {blocksize} vs bitsandbytes' pure-torch path")
    assert not torch.equal(buggy, correct), \
        (f"bitsandbytes' default dequantize_4bit now agrees on {shape}, blocksize {blocksize}: its AVX512 bug "
         "looks fixed; update dequantize_4bit's docstring and this test")
    assert (ours - x).abs().max() < (buggy - x).abs().max(), "the buggy path should be further from x"


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="bitsandbytes uses its AVX512 4-bit dequantize only on CPUs with AVX512")
def test_bitsandbytes_avx512_dequantize_is_right_when_rows_fill_whole_blocks():
    x = sample((3, 128), torch.float32, 0)  # 128 is a multiple of 64
    packed, state = quantize_4bit(x, 64, "fp4", compress_statistics=True)
    bnb_packed, bnb_state = bnb_quantize(x, 64, "fp4", compress_statistics=True)
    assert_equal(dequantize_4bit(packed, state), bnb_F.dequantize_4bit(bnb_packed, bnb_state),
                 "dequantized vs bitsandbytes' default (C, AVX512) path")


# ------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_bits_per_parameter(compress_statistics):
    x = sample((1024, 1024), torch.float16, 0)
    n, blocksize = x.numel(), 64
    packed, state = quantize_4bit(x, blocksize, "nf4", compress_statistics)
    bnb_packed, bnb_state = bnb_quantize(x, blocksize, "nf4", compress_statistics)
    bnb_tensors = [bnb_packed, bnb_state.absmax]
    if compress_statistics:
        bnb_tensors += [bnb_state.offset, bnb_state.state2.absmax]
    bnb_bits = 8 * sum(t.numel() * t.element_size() for t in bnb_tensors) / n
    bits = bits_per_parameter(packed, state)
    assert bits == bnb_bits, f"bits per parameter {bits}, but bitsandbytes' tensors hold {bnb_bits}"
    if compress_statistics:  # QLoRA: 8-bit absmax per 64 values, fp32 scale per 256 absmax, one fp32 offset
        assert bits == pytest.approx(4 + 8 / blocksize + 32 / (blocksize * 256) + 32 / n, abs=1e-12)
        assert round(bits, 3) == 4.127, "QLoRA's 4.127 bits for NF4 with double quantization, blocksize 64"
    else:  # 4 bits per value plus an fp32 absmax per 64 values
        assert bits == 4 + 32 / blocksize == 4.5, "QLoRA's 4.5 bits for NF4, blocksize 64"


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, 64.0, True])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=r"blocksize must be a power of two from 32 to 4096"):
        quantize_4bit(torch.randn(128), blocksize=blocksize)


def test_unknown_quant_type():
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'"):
        quantize_4bit(torch.randn(128), quant_type="int4")
    with pytest.raises(ValueError, match=r"quant_type must be one of"):
        get_4bit_code("NF4")


def test_empty_tensor():
    with pytest.raises(ValueError, match=r"empty tensor of shape \(0, 64\)"):
        quantize_4bit(torch.randn(0, 64))


def test_bad_dtype_and_flags():
    with pytest.raises(TypeError, match=r"dtype must be one of"):
        quantize_4bit(torch.arange(64))
    with pytest.raises(TypeError, match=r"quantize_4bit: expected a torch.Tensor"):
        quantize_4bit([1.0, 2.0])
    with pytest.raises(TypeError, match=r"compress_statistics must be True \(double quantization\) or False"):
        quantize_4bit(torch.randn(64), compress_statistics=1)


def test_dequantize_bad_inputs():
    packed, state = quantize_4bit(torch.randn(4, 64))
    with pytest.raises(ValueError, match=r"shape \(4, 64\) packs into 128 uint8 bytes, got torch.uint8 with 64"):
        dequantize_4bit(packed[:64], state)
    with pytest.raises(ValueError, match=r"got torch.int8 with 128"):
        dequantize_4bit(packed.view(torch.int8), state)
    with pytest.raises(TypeError, match=r"state must be the QuantState from quantize_4bit, got tuple"):
        dequantize_4bit(packed, (state.absmax, state.shape))
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        dequantize_4bit(packed, state, dtype=torch.float64)


def test_quant_state_fields():
    packed, state = quantize_4bit(torch.randn(3, 100, dtype=torch.bfloat16), 64, "fp4", compress_statistics=True)
    assert isinstance(state, QuantState) and state.nested
    assert packed.shape == (150, 1) and packed.dtype == torch.uint8, "300 values pack into (150, 1) bytes"
    assert state.absmax.shape == (5,) and state.absmax.dtype == torch.uint8, "5 blocks, 8-bit absmax codes"
    assert state.nested_absmax.shape == (1,) and state.nested_blocksize == 256
    assert_equal(state.nested_code, create_dynamic_map(signed=True), "nested code")
