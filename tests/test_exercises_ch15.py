"""Chapter 15's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the build
exercise (the 8-bit Adam step), plugged into `Adam8bit`, drives the chapter's 10-step bitwise comparison with
bitsandbytes on the shipped model and leaves nothing behind."""

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
from minillm.exercises import ch15, use  # noqa: E402
from minillm.quant import create_dynamic_map, dequantize_blockwise, quantize_blockwise  # noqa: E402
from minillm.quant import optim  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # as the notebooks run


def assert_three(statuses, number):
    passed, stubbed, wrong = statuses
    assert passed.startswith(f"Exercise {number}") and passed.endswith("passed ✓"), passed
    assert "not attempted yet" in stubbed, stubbed
    assert "not yet ✗" in wrong and "case" in wrong, wrong


# --- 15.1 the 8-bit Adam step (build) ----------------------------------------------------------------------------


def adam8bit_step(p, grad, state, lr, betas, eps, weight_decay, v_signed=False, textbook=False):
    beta1, beta2 = betas
    step = state["step"]
    eight_bit = "absmax1" in state
    maps = create_dynamic_map(signed=True), create_dynamic_map(signed=v_signed)
    if eight_bit:
        m, v = (dequantize_blockwise(state[f"state{i}"], state[f"absmax{i}"], maps[i - 1], 256) for i in (1, 2))
    else:
        m, v = state["state1"], state["state2"]
    g, p32 = grad.float(), p.float()
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
    if weight_decay > 0:
        p32.mul_(1 - lr * weight_decay)
    if textbook:
        p32.sub_(lr * (m / c1) / ((v / c2**2).sqrt() + eps))
    elif eight_bit:
        p32.addcdiv_(m, (v.sqrt() / c2).add_(eps), value=-lr / c1)
    else:
        p32.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
    p.copy_(p32)
    if eight_bit:
        for i, values in ((1, m), (2, v)):
            codes, absmax = quantize_blockwise(values, maps[i - 1], 256)
            state[f"state{i}"].copy_(codes)
            state[f"absmax{i}"].copy_(absmax)


def adam8bit_step_v_in_signed_map(*args):  # stores v with m's map: half the resolution, other bytes
    adam8bit_step(*args, v_signed=True)


def adam8bit_step_textbook(*args):  # the textbook arrangement: right to 1e-7, not to the bit
    adam8bit_step(*args, textbook=True)


def adam8bit_step_returning(p, grad, state, lr, betas, eps, weight_decay):  # returns p instead of updating it
    p = p.detach().clone()
    adam8bit_step(p, grad, state, lr, betas, eps, weight_decay)
    return p


def test_adam8bit_step_check(capsys):
    passed, stubbed, wrong = run_three(ch15.check_adam8bit_step, adam8bit_step, adam8bit_step_v_in_signed_map, capsys)
    assert passed == "Exercise 15.1 (the 8-bit Adam step): passed ✓"
    assert stubbed.startswith("Exercise 15.1 (the 8-bit Adam step): not attempted yet")
    assert wrong.startswith("Exercise 15.1 (the 8-bit Adam step): not yet ✗ - case 1: a (5000,) float32 parameter "
                            "(8-bit states), lr=0.01, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.0, after step 1: "
                            "state2 (v) differs first at flat index "), wrong


def test_adam8bit_step_check_wants_bitsandbytes_arrangement_and_in_place_updates(capsys):
    ch15.check_adam8bit_step(adam8bit_step_textbook)
    ch15.check_adam8bit_step(adam8bit_step_returning)
    ch15.check_adam8bit_step(lambda *args: None)
    textbook, returning, nothing = outputs(capsys)
    assert "case 1: a (5000,) float32 parameter (8-bit states)" in textbook and ": p differs first at flat index" \
        in textbook, textbook
    assert returning.endswith("after step 1: p did not change; update it in place (the function returns nothing)")
    assert nothing.endswith("after step 1: p did not change; update it in place (the function returns nothing)")


RIGHT_WRONG = [(adam8bit_step, True), (adam8bit_step_v_in_signed_map, False), (adam8bit_step_textbook, False)]
CLAIM = ("shipped model, 10 steps of Adam8bit(lr=0.001, weight_decay=0.01) with your step: parameters and all states "
         "equal bitsandbytes' Adam8bit bit for bit (18 tensors with 8-bit state, 34 with fp32 state)")


def test_end_to_end_holds_on_the_package_itself(capsys):
    assert ch15.end_to_end_adam8bit()
    assert capsys.readouterr().out == f"{CLAIM}: ✓\n"


def test_plug_in_verdict(capsys):
    with use(adam8bit_step=adam8bit_step):
        assert ch15.end_to_end_adam8bit()
    with use(adam8bit_step=adam8bit_step_v_in_signed_map):
        assert not ch15.end_to_end_adam8bit(steps=2)
    right, wrong = capsys.readouterr().out.splitlines()
    assert right == f"{CLAIM}: ✓"
    assert wrong.startswith("shipped model, 2 steps of Adam8bit(lr=0.001, weight_decay=0.01) with your step: ") \
        and ": ✗ - step 1, transformer.wte.weight: state2 differs first at flat index " in wrong, wrong


def test_plug_in_of_a_stub_is_skipped(capsys):
    with use(adam8bit_step=stub):
        ch15.end_to_end_adam8bit()
    assert capsys.readouterr().out.startswith("plug-in skipped: your adam8bit_step (exercise 15.1) is not written yet")


def test_plug_in_leaves_the_package_unchanged():
    original = optim.adam8bit_step

    def state_after_three_steps():
        p = torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(0)))
        optimizer = optim.Adam8bit([p], lr=1e-2)
        for step in range(3):
            p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(step + 1))
            optimizer.step()
        return [p.detach().clone()] + [t.clone() for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]

    before = state_after_three_steps()
    with use(adam8bit_step=adam8bit_step_v_in_signed_map):
        assert optim.adam8bit_step is adam8bit_step_v_in_signed_map
        ch15.end_to_end_adam8bit(steps=1)
    with pytest.raises(RuntimeError, match="boom"), use(adam8bit_step=adam8bit_step):
        raise RuntimeError("boom")
    assert optim.adam8bit_step is original
    after = state_after_three_steps()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# --- 15.2 dequantize an 8-bit state ------------------------------------------------------------------------------


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
                           capsys), "15.2")


# --- 15.3 Lion -------------------------------------------------------------------------------------------------


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


# --- 15.4 bytes of 8-bit Adam state ----------------------------------------------------------------------------


def adam8bit_state_bytes(numels):
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in numels)


def adam8bit_state_bytes_no_fallback(numels):  # forgets that small tensors keep fp32 states
    return sum(2 * n + 2 * 4 * math.ceil(n / 256) for n in numels)


def test_adam8bit_state_bytes_check(capsys):
    assert_three(run_three(ch15.check_adam8bit_state_bytes, adam8bit_state_bytes, adam8bit_state_bytes_no_fallback,
                           capsys), "15.4")
