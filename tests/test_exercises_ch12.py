"""Chapter 12's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
from minillm.exercises import ch12  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


# --- 12.1 pack two nibbles -------------------------------------------------------------------------


def pack_nibbles(codes):
    return (codes[0::2] << 4) | codes[1::2]


def pack_nibbles_low_first(codes):  # the other nibble order
    return (codes[1::2] << 4) | codes[0::2]


def test_pack_nibbles_check(capsys):
    passed, stubbed, wrong = run_three(ch12.check_pack_nibbles, pack_nibbles, pack_nibbles_low_first, capsys)
    assert passed == "Exercise 12.1 (pack two nibbles): passed ✓"
    assert stubbed.startswith("Exercise 12.1 (pack two nibbles): not attempted yet")
    assert wrong.startswith("Exercise 12.1 (pack two nibbles): not yet ✗ - case 1: pack_nibbles(codes of nf4, "
                            "8 values), bytes: first mismatch at index")


# --- 12.2 NF4 table -------------------------------------------------------------------------------


def nf4_code(offset=0.9677083):
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    code = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return code / code.max()


def nf4_code_evenly_spaced_probabilities():  # quantiles of 17 even probabilities, no exact zero
    code = torch.special.ndtri(torch.linspace(1 - 0.9677083, 0.9677083, 16).double()).float()
    return code / code.max()


def test_nf4_code_check(capsys):
    passed, stubbed, wrong = run_three(ch12.check_nf4_code, nf4_code, nf4_code_evenly_spaced_probabilities, capsys)
    assert passed == "Exercise 12.2 (derive the NF4 table): passed ✓"
    assert stubbed.startswith("Exercise 12.2 (derive the NF4 table): not attempted yet")
    assert wrong.startswith("Exercise 12.2 (derive the NF4 table): not yet ✗ - case 1: nf4_code(): "
                            "first mismatch at index (1,)")


# --- 12.3 bits of double quantization --------------------------------------------------------------


def bits_double_quant(n, blocksize):
    blocks = math.ceil(n / blocksize)
    total_bytes = (n + 1) // 2 + blocks + 4 + 4 * math.ceil(blocks / 256)
    return 8 * total_bytes / n


def bits_double_quant_asymptotic(n, blocksize):  # the paper's formula: right only for huge tensors
    return 4 + 8 / blocksize + 32 / (256 * blocksize)


def test_bits_double_quant_check(capsys):
    passed, stubbed, wrong = run_three(ch12.check_bits_double_quant, bits_double_quant,
                                       bits_double_quant_asymptotic, capsys)
    assert passed == "Exercise 12.3 (bits of double quantization): passed ✓"
    assert stubbed.startswith("Exercise 12.3 (bits of double quantization): not attempted yet")
    assert wrong.startswith("Exercise 12.3 (bits of double quantization): not yet ✗ - case 1: "
                            "bits_double_quant(65536, 64): expected")


def test_bits_double_quant_check_rejects_a_non_number(capsys):
    ch12.check_bits_double_quant(lambda n, blocksize: "4.127")
    (line,) = outputs(capsys)
    assert "expected a number, got str" in line


# --- 12.4 nearest-code quantization of one block ----------------------------------------------------


def quantize_block(block, code):
    absmax = block.abs().max()
    scaled = block * (1 / absmax.clamp(min=1e-38))
    return (scaled[:, None] - code).abs().argmin(dim=1).to(torch.uint8), absmax


def quantize_block_unscaled(block, code):  # forgets to divide by the absmax
    return (block[:, None] - code).abs().argmin(dim=1).to(torch.uint8), block.abs().max()


def test_quantize_block_check(capsys):
    passed, stubbed, wrong = run_three(ch12.check_quantize_block, quantize_block, quantize_block_unscaled, capsys)
    assert passed == "Exercise 12.4 (nearest-code 4-bit quantization): passed ✓"
    assert stubbed.startswith("Exercise 12.4 (nearest-code 4-bit quantization): not attempted yet")
    assert wrong.startswith("Exercise 12.4 (nearest-code 4-bit quantization): not yet ✗ - case 1: "
                            "quantize_block(64 values), codes: first mismatch at index")


def test_quantize_block_check_reports_a_wrong_return_type(capsys):
    ch12.check_quantize_block(lambda block, code: quantize_block(block, code)[0])
    (line,) = outputs(capsys)
    assert "expected a tuple (codes, absmax)" in line
