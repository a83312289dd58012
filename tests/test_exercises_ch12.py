"""Chapter 12's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
from minillm.exercises import ch12, use  # noqa: E402
from minillm.quant import QuantState, create_dynamic_map, get_4bit_code, nf4, pack_nibbles, quantize_blockwise  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


# --- 12.1 (build) quantize_4bit end to end -------------------------------------------------------------
# Written here as a learner would (a solution notebook is not importable). MISTAKE picks a plausible wrong
# answer: "ties up" sends a value on a midpoint to the upper entry, "no offset" double-quantizes the absmax
# without subtracting its mean first.


def quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False, mistake=None):
    code = get_4bit_code(quant_type)  # (16,)
    flat = x.reshape(-1).float()  # (n,)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (full // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (full // blocksize,)
    scaled = (blocks * (1 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)  # whole blocks: times the reciprocal
    if full < n:  # the ragged last block divides
        tail_absmax = flat[full:].abs().max()
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax.clamp(min=1e-38)])
    if n % 2:
        scaled = torch.cat([scaled, torch.zeros(1)])
    order = torch.argsort(code, stable=True)  # FP4's table is in bit order
    midpoints = (code[order][:-1] + code[order][1:]) / 2  # (15,)
    codes = order[torch.searchsorted(midpoints, scaled, right=mistake == "ties up")].to(torch.uint8)
    state = QuantState(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=code)
    if compress_statistics:
        offset = absmax.mean() if mistake != "no offset" else torch.zeros(())
        nested_code = create_dynamic_map(signed=True)
        absmax_codes, nested_absmax = quantize_blockwise(absmax - offset, nested_code, blocksize=256)
        state = QuantState(absmax=absmax_codes, shape=x.shape, dtype=x.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=code, offset=offset, nested_absmax=nested_absmax,
                           nested_code=nested_code, nested_blocksize=256)
    return pack_nibbles(codes)[:, None], state


def ties_up(x, blocksize=64, quant_type="nf4", compress_statistics=False):
    return quantize_4bit(x, blocksize, quant_type, compress_statistics, mistake="ties up")


def no_offset(x, blocksize=64, quant_type="nf4", compress_statistics=False):
    return quantize_4bit(x, blocksize, quant_type, compress_statistics, mistake="no offset")


def test_quantize_4bit_check(capsys):
    passed, stubbed, wrong = run_three(ch12.check_quantize_4bit, quantize_4bit, ties_up, capsys)
    assert passed == "Exercise 12.1 (quantize_4bit end to end): passed ✓"
    assert stubbed.startswith("Exercise 12.1 (quantize_4bit end to end): not attempted yet")
    assert wrong.startswith("Exercise 12.1 (quantize_4bit end to end): not yet ✗ - case 3: quantize_4bit(values on "
                            "the code's midpoints and one ulp above, blocksize=64, 'nf4', compress_statistics=False): "
                            "packed bytes: first mismatch at index (0, 0)")


def test_quantize_4bit_check_flags_a_missing_offset_and_a_bad_return(capsys):
    ch12.check_quantize_4bit(no_offset)
    ch12.check_quantize_4bit(lambda x, *args: quantize_4bit(x, *args)[0])
    missing_offset, packed_only = outputs(capsys)
    assert missing_offset.startswith("Exercise 12.1 (quantize_4bit end to end): not yet ✗ - case 5: ")
    assert "state.absmax (8-bit codes of absmax - offset): first mismatch" in missing_offset
    assert packed_only.endswith("expected a tuple (packed, state), got Tensor")


def reference_codes():
    """The chapter's reference output: the package's codes of one shipped-model weight."""
    from minillm.pretrained import load_pretrained

    return nf4.quantize_4bit(load_pretrained()[0].transformer.h[0].mlp.c_fc.weight.detach(), 64, "nf4", True)


def test_quantize_4bit_plugged_in(capsys):
    original = nf4.quantize_4bit
    packed_before, state_before = reference_codes()
    with use(quantize_4bit=quantize_4bit):
        assert nf4.quantize_4bit is quantize_4bit
        assert ch12.end_to_end_quantize_4bit()
    with use(quantize_4bit=no_offset):
        assert not ch12.end_to_end_quantize_4bit()
    with use(quantize_4bit=stub):
        ch12.end_to_end_quantize_4bit()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ch12.CLAIM_12 + ": ✓"
    assert lines[1].startswith(ch12.CLAIM_12 + ": ✗ - nf4 + DQ, transformer.h.0.attn.c_attn: state.absmax")
    assert lines[2].startswith("plug-in skipped: your quantize_4bit (exercise 12.1) is not written yet")
    assert nf4.quantize_4bit is original
    packed_after, state_after = reference_codes()
    assert torch.equal(packed_after, packed_before) and torch.equal(state_after.absmax, state_before.absmax)


def test_quantize_4bit_plug_in_restores_on_error():
    original = nf4.quantize_4bit
    with pytest.raises(RuntimeError):
        with use(quantize_4bit=quantize_4bit):
            raise RuntimeError("a learner's cell failed")
    assert nf4.quantize_4bit is original


# --- 12.2 pack two nibbles -------------------------------------------------------------------------


def pack_nibbles_low_first(codes):  # the other nibble order
    return (codes[1::2] << 4) | codes[0::2]


def test_pack_nibbles_check(capsys):
    passed, stubbed, wrong = run_three(ch12.check_pack_nibbles, pack_nibbles, pack_nibbles_low_first, capsys)
    assert passed == "Exercise 12.2 (pack two nibbles): passed ✓"
    assert stubbed.startswith("Exercise 12.2 (pack two nibbles): not attempted yet")
    assert wrong.startswith("Exercise 12.2 (pack two nibbles): not yet ✗ - case 1: pack_nibbles(codes of nf4, "
                            "8 values), bytes: first mismatch at index")


# --- 12.3 NF4 table -------------------------------------------------------------------------------


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
    assert passed == "Exercise 12.3 (derive the NF4 table): passed ✓"
    assert stubbed.startswith("Exercise 12.3 (derive the NF4 table): not attempted yet")
    assert wrong.startswith("Exercise 12.3 (derive the NF4 table): not yet ✗ - case 1: nf4_code(): "
                            "first mismatch at index (1,)")


# --- 12.4 bits of double quantization --------------------------------------------------------------


def bits_double_quant(n, blocksize):
    blocks = math.ceil(n / blocksize)
    total_bytes = (n + 1) // 2 + blocks + 4 + 4 * math.ceil(blocks / 256)
    return 8 * total_bytes / n


def bits_double_quant_asymptotic(n, blocksize):  # the paper's formula: right only for huge tensors
    return 4 + 8 / blocksize + 32 / (256 * blocksize)


def test_bits_double_quant_check(capsys):
    passed, stubbed, wrong = run_three(ch12.check_bits_double_quant, bits_double_quant,
                                       bits_double_quant_asymptotic, capsys)
    assert passed == "Exercise 12.4 (bits of double quantization): passed ✓"
    assert stubbed.startswith("Exercise 12.4 (bits of double quantization): not attempted yet")
    assert wrong.startswith("Exercise 12.4 (bits of double quantization): not yet ✗ - case 1: "
                            "bits_double_quant(65536, 64): expected")


def test_bits_double_quant_check_rejects_a_non_number(capsys):
    ch12.check_bits_double_quant(lambda n, blocksize: "4.127")
    (line,) = outputs(capsys)
    assert "expected a number, got str" in line
