"""Checks for chapter 12's exercises. bitsandbytes judges every answer: its `quantize_4bit` gives the packed
bytes, codes and double-quantization state, and its `get_4bit_type` the NF4 table, all run inside the check."""

import copy
import math

import torch

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict


def _bnb():
    import bitsandbytes.functional as bnb_F  # imported here: importing bitsandbytes takes a moment
    return bnb_F


def _bnb_codes(x: torch.Tensor, blocksize: int,
               quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' (packed bytes (m,), codes (2m,) in 0..15, absmax) of x, codes unpacked with torch ops."""
    packed, state = _bnb().quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    packed = packed.reshape(-1)  # (m,)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)  # (2m,), high nibble first
    return packed, codes, state.absmax


def _same_bits(got, expected, what: str) -> None:
    """Raise `Mismatch` unless `got` is a tensor equal to `expected` in shape, dtype and every value."""
    got = expect_tensor(got, expected, what)
    expect_equal(got.double(), expected.double(), what=what, atol=0, rtol=0)


def compare_with_bnb(packed, state, x: torch.Tensor, blocksize: int, quant_type: str, nested: bool) -> None:
    """Raise `Mismatch` naming the first difference between (packed, state) and bitsandbytes' `quantize_4bit` of x:
    the bytes, the absmax (or its 8-bit codes), the offset and the nested absmax, and the state's bookkeeping."""
    theirs, bnb_state = _bnb().quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                            compress_statistics=nested)
    _same_bits(packed, theirs, "packed bytes")
    for field in ("absmax", "shape", "dtype", "blocksize", "quant_type", "offset", "nested_absmax"):
        if not hasattr(state, field):
            raise Mismatch(f"the state has no `{field}`: return (packed, QuantState(...)) as the spec says")
    for field, expected in [("shape", x.shape), ("dtype", x.dtype), ("blocksize", blocksize),
                            ("quant_type", quant_type)]:
        if getattr(state, field) != expected:
            raise Mismatch(f"state.{field}: expected {expected!r}, got {getattr(state, field)!r}")
    _same_bits(state.absmax, bnb_state.absmax, "state.absmax" + (" (8-bit codes of absmax - offset)" if nested else ""))
    if nested:
        _same_bits(state.offset, bnb_state.offset, "state.offset (the mean of the absmax values)")
        _same_bits(state.nested_absmax, bnb_state.state2.absmax, "state.nested_absmax")
    elif state.offset is not None or state.nested_absmax is not None:
        raise Mismatch("without compress_statistics the state must have offset=None and nested_absmax=None")


# --- 12.1 (build) quantize_4bit end to end -----------------------------------------------------------------


@exercise("12.1", "quantize_4bit end to end", kind="build", component="quantize_4bit",
          replaces="minillm.quant.nf4:quantize_4bit", hides=("quantize_4bit",))
def check_quantize_4bit(quantize_4bit) -> None:
    """Exercise 12.1: `quantize_4bit(x, blocksize, quant_type, compress_statistics)` returns (packed, QuantState)
    equal, byte for byte, to bitsandbytes' `quantize_4bit` (NF4 and FP4, ragged blocks, odd counts, ties,
    all-zero blocks, fp32/fp16/bf16, with and without double quantization)."""
    def case(x: torch.Tensor, blocksize: int, quant_type: str, nested: bool, label: str):
        def run():
            what = (f"quantize_4bit({label}, blocksize={blocksize}, {quant_type!r}, "
                    f"compress_statistics={nested})")
            got = quantize_4bit(x.clone(), blocksize, quant_type, nested)
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"{what}: expected a tuple (packed, state), got {type(got).__name__}")
            try:
                compare_with_bnb(*got, x, blocksize, quant_type, nested)
            except Mismatch as wrong:
                raise Mismatch(f"{what}: {wrong}") from None
        return run

    g = torch.Generator().manual_seed(12)
    nf4 = _bnb().get_4bit_type("nf4", device="cpu")
    midpoints = (nf4[:-1] + nf4[1:]) / 2  # (15,) fp32: a value exactly here is a tie
    ties = torch.cat([torch.ones(1), midpoints, torch.nextafter(midpoints, torch.ones(1)), -torch.ones(33)])  # (64,)
    zero_block = torch.randn(1001, generator=g)
    zero_block[128:256] = 0.0
    cases = [case(torch.randn(256, 128, generator=g), 64, "nf4", False, "a (256, 128) fp32 weight"),
             case(torch.randn(3, 333, generator=g) * 3 - 1, 64, "nf4", False, "(3, 333): odd count, ragged block"),
             case(ties, 64, "nf4", False, "values on the code's midpoints and one ulp above"),
             case(torch.randn(3, 333, generator=g).to(torch.bfloat16), 32, "fp4", False, "(3, 333) bf16"),
             case(torch.randn(64, 256, generator=g) * 0.02, 64, "nf4", True, "(64, 256) weights of scale 0.02"),
             case(zero_block.to(torch.float16), 128, "fp4", True, "(1001,) fp16 with an all-zero block")]
    check("12.1", cases,
          hint="blocks of blocksize values (the last one may be shorter), each scaled into [-1, 1] by its absmax; "
               "nearest code entry, decided against the midpoints between sorted entries; two codes per byte; "
               "with compress_statistics, the absmax values themselves go through chapter 11's 8-bit "
               "blockwise quantization after subtracting their mean",
          more="bitsandbytes multiplies whole blocks by 1/absmax but divides the ragged last block; a value "
               "exactly on a midpoint goes to the lower entry; an odd count gets one 0.0 appended before packing; "
               "FP4's table is not sorted, so sort it (stably) to find midpoints and map back to the codes; the "
               "nested blocks hold 256 absmax values and use the signed dynamic map")


def end_to_end_quantize_4bit() -> bool:
    """Every linear weight of the shipped model, quantized by `quantize_model` (which calls
    `minillm.quant.nf4.quantize_4bit`, the learner's inside `use(quantize_4bit=...)`), against bitsandbytes'
    `quantize_4bit` of the same weight: packed bytes and state equal, for NF4 with double quantization and FP4.
    Bit for bit is sound on any CPU: both sides compute the same correctly rounded fp32 operations (a max of
    absolute values, a reciprocal, a product, comparisons, torch's mean on the same tensor), so both must agree."""
    from minillm.pretrained import load_pretrained
    from minillm.quant import Int4Linear, quantize_model

    model, _ = load_pretrained()
    weights = {name: m.weight.detach() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    for quant_type, nested in [("nf4", True), ("fp4", False)]:
        quantized = quantize_model(copy.deepcopy(model), quant_type, compress_statistics=nested)
        for name, layer in quantized.named_modules():
            if isinstance(layer, Int4Linear):
                try:
                    compare_with_bnb(layer.weight_packed, layer.quant_state, weights[name], 64, quant_type, nested)
                except Mismatch as wrong:
                    return verdict(False, CLAIM_12, f"{quant_type}{' + DQ' if nested else ''}, {name}: {wrong}")
    return verdict(True, CLAIM_12)


CLAIM_12 = ("every linear weight of the shipped model, quantized by your quantize_4bit, has bytes and state "
            "equal to bitsandbytes' (NF4 + double quantization, and FP4)")


# --- practice --------------------------------------------------------------------------------------------


@exercise("12.2", "pack two nibbles")
def check_pack_nibbles(pack_nibbles) -> None:
    """Exercise 12.2: `pack_nibbles(codes)` turns (2m,) uint8 codes in 0..15 into (m,) uint8 bytes, as
    bitsandbytes stores them."""
    def case(n, blocksize, quant_type, seed):
        def run():
            x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3 - 0.5
            packed, codes, _ = _bnb_codes(x, blocksize, quant_type)
            got = pack_nibbles(codes.clone())
            what = f"pack_nibbles(codes of {quant_type}, {codes.numel()} values)"
            expect_tensor(got, packed, what)
            expect_equal(got.long(), packed.long(), what=f"{what}, bytes", atol=0, rtol=0)
        return run

    cases = [case(8, 64, "nf4", 1), case(64, 64, "nf4", 2), case(200, 32, "fp4", 3), case(1000, 128, "nf4", 4)]
    check("12.2", cases,
          hint="the first code of each pair goes in the byte's upper four bits, the second in its lower four",
          more="take the even-indexed and odd-indexed codes as two half-length tensors; a shift and a bitwise or "
               "combine them, and uint8 arithmetic keeps the result a byte")


@exercise("12.3", "derive the NF4 table")
def check_nf4_code(nf4_code) -> None:
    """Exercise 12.3: `nf4_code()` returns the (16,) fp32 NormalFloat table, sorted, from -1 to 1."""
    def run():
        expected = _bnb().get_4bit_type("nf4", device="cpu")
        got = nf4_code()
        expect_tensor(got, expected, "nf4_code()")
        expect_equal(got, expected, what="nf4_code()", atol=1e-6, rtol=0)

    check("12.3", [run],
          hint="the levels are normal quantiles (inverse CDF) of evenly spaced probabilities, more on the positive "
               "side than the negative, plus an exact zero, scaled so the largest is 1",
          more="the probabilities run from 0.9677083 down to 0.5 (0.5 itself excluded: its quantile is the zero "
               "you add separately), 8 points for the positive side and 7 for the negative; compute the quantiles "
               "in float64 and round them to fp32, as bitsandbytes did")


@exercise("12.4", "bits of double quantization")
def check_bits_double_quant(bits_double_quant) -> None:
    """Exercise 12.4: `bits_double_quant(n, blocksize)` is the bits per value of an NF4 tensor of n values with
    double quantization, counted over every tensor bitsandbytes stores (codes tables excluded)."""
    def case(n, blocksize):
        def run():
            packed, state = _bnb().quantize_4bit(torch.randn(n, generator=torch.Generator().manual_seed(n)),
                                                 blocksize=blocksize, quant_type="nf4", compress_statistics=True)
            tensors = [packed, state.absmax, state.offset, state.state2.absmax]
            expected = 8 * sum(t.numel() * t.element_size() for t in tensors) / n
            got = bits_double_quant(n, blocksize)
            if not isinstance(got, (int, float)) or isinstance(got, bool):
                raise Mismatch(f"bits_double_quant({n}, {blocksize}): expected a number, got {type(got).__name__}")
            expect_equal(float(got), expected, what=f"bits_double_quant({n}, {blocksize})", atol=1e-9, rtol=0)
        return run

    cases = [case(64 * 256 * 4, 64), case(1000, 64), case(4097, 32), case(128 * 300, 128), case(7, 64)]
    check("12.4", cases,
          hint="count the bytes of every stored tensor, then convert to bits per value; small tensors pay for "
               "partly filled blocks, so round up",
          more="four tensors: the packed codes, one 8-bit code per block, the fp32 offset, and one fp32 nested "
               "absmax per 256 blocks")
