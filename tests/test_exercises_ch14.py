"""Chapter 14's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
import torch.nn.functional as F  # noqa: E402

from minillm.exercises import ch14, use  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


# --- 14.1 (build) Linear4bitFunction --------------------------------------------------------------
# Written here as a learner would. The wrong answers: the backward returns no dL/dx ("the weight is frozen"),
# and a forward that keeps the dequantized weight on ctx instead of dequantizing again.


class Linear4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(), bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = torch.matmul(grad_y, ctx.layer.dequantized_weight()) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


class NoInputGradient(Linear4bitFunction):
    @staticmethod
    def backward(ctx, grad_y):
        return None, None, None


class KeepsTheWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.weight = layer.dequantized_weight()  # a full-precision copy kept until the backward
        return F.linear(x, ctx.weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return torch.matmul(grad_y, ctx.weight), grad_bias, None


class Stub(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, layer):
        raise NotImplementedError


def test_linear4bit_function_check(capsys):
    passed, stubbed, wrong = run_three(ch14.check_linear4bit_function, Linear4bitFunction, NoInputGradient, capsys)
    assert passed == "Exercise 14.1 (Linear4bitFunction): passed ✓"
    assert wrong == ("Exercise 14.1 (Linear4bitFunction): not yet ✗ - case 1: 64x128 weight, x (4, 128) float32: "
                     "dL/dx is None; the weight is frozen but x still needs its gradient")
    ch14.check_linear4bit_function(Stub)
    ch14.check_linear4bit_function(KeepsTheWeight)
    stub_line, keeps = outputs(capsys)
    assert stubbed.startswith("Exercise 14.1 (Linear4bitFunction): not yet ✗") and "got function" in stubbed, (
        "a plain function is not an autograd.Function")
    assert stub_line.startswith("Exercise 14.1 (Linear4bitFunction): not attempted yet")
    assert keeps.endswith("the backward did not dequantize the weight again; it must call "
                          "layer.dequantized_weight() itself rather than keep the forward's copy")


def test_linear4bit_function_plugged_in(capsys):
    from minillm.quant import linear4bit

    original = linear4bit.Linear4bitFunction
    with use(Linear4bitFunction=Linear4bitFunction):
        assert linear4bit.Linear4bitFunction is Linear4bitFunction
        assert ch14.end_to_end_linear4bit_function()
    with use(Linear4bitFunction=NoInputGradient):
        assert not ch14.end_to_end_linear4bit_function()
    with use(Linear4bitFunction=Stub):
        ch14.end_to_end_linear4bit_function()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ch14.CLAIM_14 + ": ✓"
    assert lines[1] == ch14.CLAIM_14 + ": ✗ - the gradient of transformer.h.0.attn.c_attn's lora_A differs first"
    assert lines[2].startswith("plug-in skipped: your Linear4bitFunction (exercise 14.1) is not written yet")
    assert linear4bit.Linear4bitFunction is original
    with pytest.raises(RuntimeError):
        with use(Linear4bitFunction=Linear4bitFunction):
            raise RuntimeError("a learner's cell failed")
    assert linear4bit.Linear4bitFunction is original


# --- 14.2 count LoRA parameters ------------------------------------------------------------------


def lora_parameter_count(shapes, r):
    return sum(r * (out + inp) for out, inp in shapes)


def lora_parameter_count_square(shapes, r):  # as if every layer were square: r * 2 * in
    return sum(2 * r * inp for _, inp in shapes)


def test_lora_parameter_count_check(capsys):
    passed, stubbed, wrong = run_three(ch14.check_lora_parameter_count, lora_parameter_count,
                                       lora_parameter_count_square, capsys)
    assert passed == "Exercise 14.2 (count LoRA parameters): passed ✓"
    assert stubbed.startswith("Exercise 14.2 (count LoRA parameters): not attempted yet")
    assert wrong.startswith("Exercise 14.2 (count LoRA parameters): not yet ✗ - case 1: "
                            "lora_parameter_count([(384, 128)], r=8): expected 4096, got 2048")


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
    assert line.startswith("Exercise 14.2 (count LoRA parameters): not yet ✗ - case 1: your code raised IndexError")
    ch14.check_linear4bit_function(None)
    line = outputs(capsys)[0]
    assert line.endswith("expected a torch.autograd.Function subclass, got NoneType")
