"""Checks for chapter 12's exercises. bitsandbytes judges every answer: its `quantize_4bit` gives the packed
bytes, codes and double-quantization state, and its `get_4bit_type` the NF4 table, all run inside the check."""

import math

import torch

from minillm.exercises import Mismatch, check, expect_equal, expect_tensor


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




def check_pack_nibbles(pack_nibbles) -> None:
    """Exercise 12.1: `pack_nibbles(codes)` turns (2m,) uint8 codes in 0..15 into (m,) uint8 bytes, as
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
    check("Exercise 12.1 (pack two nibbles)", cases,
          hint="element 2i goes to the HIGH nibble: (codes[0::2] << 4) | codes[1::2], kept as uint8")


def check_nf4_code(nf4_code) -> None:
    """Exercise 12.2: `nf4_code()` returns the (16,) fp32 NormalFloat table, sorted, from -1 to 1."""
    def run():
        expected = _bnb().get_4bit_type("nf4", device="cpu")
        got = nf4_code()
        expect_tensor(got, expected, "nf4_code()")
        expect_equal(got, expected, what="nf4_code()", atol=1e-6, rtol=0)

    check("Exercise 12.2 (derive the NF4 table)", [run],
          hint="8 positive quantiles torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1]), 7 negative ones "
               "from linspace(0.9677083, 0.5, 8)[:-1], an exact 0; sort, divide by the largest")


def check_bits_double_quant(bits_double_quant) -> None:
    """Exercise 12.3: `bits_double_quant(n, blocksize)` is the bits per value of an NF4 tensor of n values with
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
    check("Exercise 12.3 (bits of double quantization)", cases,
          hint="count bytes: ceil(n/2) packed, one uint8 per block (ceil(n/blocksize)), a 4-byte offset, and a "
               "4-byte fp32 absmax per 256 blocks (rounded up); multiply by 8 and divide by n")


def check_quantize_block(quantize_block) -> None:
    """Exercise 12.4: `quantize_block(block, code)` gives (uint8 codes (n,), absmax) of one block: each value
    divided by the block's absmax and replaced by the index of the nearest entry of the sorted NF4 `code`."""
    def case(values):
        def run():
            n = values.numel()
            blocksize = max(32, 2 ** math.ceil(math.log2(n)))  # one block holds them all
            _, codes, absmax = _bnb_codes(values, blocksize, "nf4")
            table = _bnb().get_4bit_type("nf4", device="cpu")
            got = quantize_block(values.clone(), table)
            what = f"quantize_block({n} values)"
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"{what}: expected a tuple (codes, absmax)")
            got_codes, got_absmax = got
            expect_tensor(got_codes, codes[:n], f"{what}, codes")
            expect_equal(got_codes.long(), codes[:n].long(), what=f"{what}, codes", atol=0, rtol=0)
            expect_equal(float(got_absmax), float(absmax[0]), what=f"{what}, absmax", atol=0, rtol=0)
        return run

    g = torch.Generator().manual_seed(12)
    with_zeros = torch.randn(64, generator=g)
    with_zeros[::5] = 0.0
    blocks = [torch.randn(64, generator=g), 10 * torch.randn(32, generator=g) - 4, with_zeros,
              -torch.rand(64, generator=g)]
    cases = [case(block) for block in blocks]
    check("Exercise 12.4 (nearest-code 4-bit quantization)", cases,
          hint="absmax = block.abs().max(); scaled = block * (1 / absmax); codes = (scaled[:, None] - code).abs()"
               ".argmin(dim=1).to(torch.uint8) - argmin picks the lower index on a tie, as bitsandbytes")
