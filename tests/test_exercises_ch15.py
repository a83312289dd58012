"""Chapter 15's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
from minillm.exercises import ch15  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


def assert_three(statuses, number):
    passed, stubbed, wrong = statuses
    assert passed.startswith(f"Exercise {number}") and passed.endswith("passed ✓"), passed
    assert "not attempted yet" in stubbed, stubbed
    assert "not yet ✗" in wrong and "case" in wrong, wrong


# --- 15.1 dequantize an 8-bit state ----------------------------------------------------------------


def dequantize_state(codes, absmax, code):
    n = codes.numel()
    scale = absmax.repeat_interleave(256)[:n]  # (n,)
    return (code[codes.reshape(-1).long()] * scale).reshape(codes.shape)


def dequantize_state_chapter11_blocks(codes, absmax, code):  # chapter 11's default blocksize, not the optimizer's
    n = codes.numel()
    scale = absmax.repeat_interleave(4096)[:n]
    return (code[codes.reshape(-1).long()] * scale).reshape(codes.shape)


def test_dequantize_state_check(capsys):
    assert_three(run_three(ch15.check_dequantize_state, dequantize_state, dequantize_state_chapter11_blocks,
                           capsys), "15.1")


# --- 15.2 one Adam step ----------------------------------------------------------------------------


def adam_step(p, grad, m, v, step, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    p = p * (1 - lr * weight_decay)
    p = p - lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    return p, m, v


def adam_step_coupled_decay(p, grad, m, v, step, lr, betas, eps, weight_decay):  # torch.optim.Adam's decay
    return adam_step(p, grad + weight_decay * p, m, v, step, lr, betas, eps, 0.0)


def test_adam_step_check(capsys):
    assert_three(run_three(ch15.check_adam_step, adam_step, adam_step_coupled_decay, capsys), "15.2")


# --- 15.3 Lion -------------------------------------------------------------------------------------


def lion_step(p, grad, m, lr, betas, weight_decay):
    beta1, beta2 = betas
    p = p * (1 - lr * weight_decay)
    p = p - lr * torch.sign(beta1 * m + (1 - beta1) * grad)
    m = beta2 * m + (1 - beta2) * grad
    return p, m


def lion_step_momentum_first(p, grad, m, lr, betas, weight_decay):  # updates m before taking the sign
    beta1, beta2 = betas
    m = beta2 * m + (1 - beta2) * grad
    return p * (1 - lr * weight_decay) - lr * torch.sign(m), m


def test_lion_step_check(capsys):
    assert_three(run_three(ch15.check_lion_step, lion_step, lion_step_momentum_first, capsys), "15.3")


# --- 15.4 bytes of 8-bit Adam state ----------------------------------------------------------------


def adam8bit_state_bytes(numels):
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in numels)


def adam8bit_state_bytes_no_fallback(numels):  # forgets that small tensors keep fp32 states
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in numels)


def test_adam8bit_state_bytes_check(capsys):
    assert_three(run_three(ch15.check_adam8bit_state_bytes, adam8bit_state_bytes, adam8bit_state_bytes_no_fallback,
                           capsys), "15.4")
