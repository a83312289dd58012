"""Chapter 14's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
from minillm.exercises import ch14  # noqa: E402
from minillm.quant.nf4 import dequantize_4bit, get_4bit_code, unpack_nibbles  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


# --- 14.1 count LoRA parameters ------------------------------------------------------------------


def lora_parameter_count(shapes, r):
    return sum(r * (out + inp) for out, inp in shapes)


def lora_parameter_count_square(shapes, r):  # as if every layer were square: r * 2 * in
    return sum(2 * r * inp for _, inp in shapes)


def test_lora_parameter_count_check(capsys):
    passed, stubbed, wrong = run_three(ch14.check_lora_parameter_count, lora_parameter_count,
                                       lora_parameter_count_square, capsys)
    assert passed == "Exercise 14.1 (count LoRA parameters): passed ✓"
    assert stubbed.startswith("Exercise 14.1 (count LoRA parameters): not attempted yet")
    assert wrong.startswith("Exercise 14.1 (count LoRA parameters): not yet ✗ - case 1: "
                            "lora_parameter_count([(384, 128)], r=8): expected 4096, got 2048")


# --- 14.2 backward through dequantize ------------------------------------------------------------


def linear4bit_backward(grad_y, packed, state):
    return grad_y @ dequantize_4bit(packed, state, dtype=grad_y.dtype)


def linear4bit_backward_raw_absmax(grad_y, packed, state):  # reads the double-quantized uint8 codes as scales
    n = math.prod(state.shape)
    codes = unpack_nibbles(packed.reshape(-1))[:n].long()
    scale = state.absmax.float().repeat_interleave(state.blocksize)[:n]
    weight = (get_4bit_code("nf4")[codes] * scale).reshape(state.shape).to(grad_y.dtype)
    return grad_y @ weight


def test_linear4bit_backward_check(capsys):
    passed, stubbed, wrong = run_three(ch14.check_linear4bit_backward, linear4bit_backward,
                                       linear4bit_backward_raw_absmax, capsys)
    assert passed == "Exercise 14.2 (backward through dequantize): passed ✓"
    assert stubbed.startswith("Exercise 14.2 (backward through dequantize): not attempted yet")
    assert wrong.startswith("Exercise 14.2 (backward through dequantize): not yet ✗ - case 2: linear4bit_backward "
                            "for a (96, 64) weight, grad_y (2, 5, 96) torch.float32: first mismatch at index")


# --- 14.3 QLoRA training memory ------------------------------------------------------------------


def qlora_training_bytes(hidden, intermediate, num_layers, vocab, r):
    def int4_bytes(n):
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 + 4 * math.ceil(blocks / 256)

    linears = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    quantized = num_layers * sum(int4_bytes(out * inp) for out, inp in linears)
    full_precision = 4 * (2 * vocab * hidden + (2 * num_layers + 1) * hidden)
    adapters = num_layers * sum(r * (out + inp) for out, inp in linears)
    return quantized + full_precision + adapters * (4 + 4 + 8)


def qlora_training_bytes_paper_bits(hidden, intermediate, num_layers, vocab, r):  # 4.127 bits, rounded
    linears = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    quantized = num_layers * sum(round(out * inp * 4.127 / 8) for out, inp in linears)
    full_precision = 4 * (2 * vocab * hidden + (2 * num_layers + 1) * hidden)
    adapters = num_layers * sum(r * (out + inp) for out, inp in linears)
    return quantized + full_precision + adapters * 16


def test_qlora_training_bytes_check(capsys):
    passed, stubbed, wrong = run_three(ch14.check_qlora_training_bytes, qlora_training_bytes,
                                       qlora_training_bytes_paper_bits, capsys)
    assert passed == "Exercise 14.3 (QLoRA training memory): passed ✓"
    assert stubbed.startswith("Exercise 14.3 (QLoRA training memory): not attempted yet")
    assert wrong.startswith("Exercise 14.3 (QLoRA training memory): not yet ✗ - case 1: "
                            "qlora_training_bytes(64, 128, 1, 96, r=4)")


def test_checks_report_a_crash_instead_of_raising(capsys):
    ch14.check_lora_parameter_count(lambda shapes, r: shapes[5])
    line = outputs(capsys)[0]
    assert line.startswith("Exercise 14.1 (count LoRA parameters): not yet ✗ - case 1: your code raised IndexError")
    ch14.check_linear4bit_backward(lambda grad_y, packed, state: grad_y)
    line = outputs(capsys)[0]
    assert "expected a torch.float32 tensor of shape (4, 128), got torch.float32 (4, 64)" in line
