"""Chapter 08's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the training step
plugged into minillm.train reproduces minillm's own losses, and leaves nothing behind."""

import math

import pytest
import torch
import torch.nn.functional as F

from minillm import exercises
from minillm import train as train_module
from minillm.exercises import ch08, use
from exercise_helpers import outputs, run_three, stub


pytestmark = pytest.mark.usefixtures("one_thread")  # as the notebooks run


# --- 8.3 warmup + cosine ----------------------------------------------------------------------------


def lr_at(step, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * t)) / 2


def lr_at_warmup_from_zero(step, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * step / warmup_steps  # starts at 0: the first step would not move at all
    return lr_at(step, max_lr, min_lr, warmup_steps, total_steps)


def test_lr_at_check(capsys):
    ch08.check_lr_at(lr_at)
    ch08.check_lr_at(stub)
    ch08.check_lr_at(lr_at_warmup_from_zero)
    passed, stubbed, wrong = outputs(capsys)
    assert passed == "Exercise 8.3 (warmup + cosine): passed ✓"
    assert stubbed.startswith("Exercise 8.3 (warmup + cosine): not attempted yet")
    assert wrong.startswith("Exercise 8.3 (warmup + cosine): not yet ✗ - case 1: lr_at(0, max_lr=0.001, min_lr=0.0001, "
                            "warmup_steps=3, total_steps=12): expected 0.00025, got 0")


# --- 8.1 get_batch ----------------------------------------------------------------------------------


def get_batch(tokens, batch_size, block_size, generator):
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def get_batch_unshifted(tokens, batch_size, block_size, generator):
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s:s + block_size] for s in starts.tolist()])
    return windows, windows  # targets equal to inputs: the model would learn to copy


def test_get_batch_check(capsys):
    ch08.check_get_batch(get_batch)
    ch08.check_get_batch(stub)
    ch08.check_get_batch(get_batch_unshifted)
    ch08.check_get_batch(lambda tokens, b, t, g: get_batch(tokens, b, t, g)[0])
    passed, stubbed, wrong, not_pair = outputs(capsys)
    assert passed == "Exercise 8.1 (get_batch): passed ✓"
    assert stubbed.startswith("Exercise 8.1 (get_batch): not attempted yet")
    assert wrong.startswith("Exercise 8.1 (get_batch): not yet ✗ - case 1: get_batch(tokens of length 50, "
                            "batch_size=4, block_size=8) targets: first mismatch at index (0, 0)")
    assert "expected a pair (inputs, targets), got Tensor" in not_pair


# --- 8.4 clip by global norm ------------------------------------------------------------------------


def clip_grad_norm(grads, max_norm):
    norm = torch.sqrt(sum((grad ** 2).sum() for grad in grads))
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    return [grad * scale for grad in grads], norm.item()


def clip_each_separately(grads, max_norm):
    clipped = [grad * min(1.0, max_norm / (grad.norm().item() + 1e-6)) for grad in grads]
    return clipped, torch.sqrt(sum((grad ** 2).sum() for grad in grads)).item()


def test_clip_grad_norm_check(capsys):
    ch08.check_clip_grad_norm(clip_grad_norm)
    ch08.check_clip_grad_norm(stub)
    ch08.check_clip_grad_norm(clip_each_separately)
    passed, stubbed, wrong = outputs(capsys)
    assert passed == "Exercise 8.4 (clip by global norm): passed ✓"
    assert stubbed.startswith("Exercise 8.4 (clip by global norm): not attempted yet")
    assert wrong.startswith("Exercise 8.4 (clip by global norm): not yet ✗ - case 1: clipped gradient 0 "
                            "(max_norm=1.0): first mismatch at index")


# --- 8.2 unigram baseline ---------------------------------------------------------------------------


def unigram_loss(train_tokens, targets, vocab_size):
    counts = torch.bincount(train_tokens, minlength=vocab_size).double()
    log_p = torch.log((counts + 1) / (len(train_tokens) + vocab_size))
    return -log_p[targets].mean().item()


def unigram_loss_unsmoothed_denominator(train_tokens, targets, vocab_size):
    counts = torch.bincount(train_tokens, minlength=vocab_size).double()
    log_p = torch.log((counts + 1) / len(train_tokens))  # forgot the V added ones: not a distribution
    return -log_p[targets].mean().item()


def test_unigram_loss_check(capsys):
    ch08.check_unigram_loss(unigram_loss)
    ch08.check_unigram_loss(stub)
    ch08.check_unigram_loss(unigram_loss_unsmoothed_denominator)
    passed, stubbed, wrong = outputs(capsys)
    assert passed == "Exercise 8.2 (unigram baseline): passed ✓"
    assert stubbed.startswith("Exercise 8.2 (unigram baseline): not attempted yet")
    assert wrong.startswith("Exercise 8.2 (unigram baseline): not yet ✗ - case 1: unigram_loss(100 train tokens, "
                            "30 targets, vocab_size=10): expected")


# --- 8.5 one training step (build) ------------------------------------------------------------------


def train_step(model, optimizer, micro_batches, step, config, lr_shift=0, zero_grad=True, sum_first=False):
    lr = train_module.lr_at(step + lr_shift, max_lr=config.max_lr, min_lr=config.min_lr,
                            warmup_steps=config.warmup_steps, total_steps=config.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if zero_grad:
        optimizer.zero_grad()
    losses = []
    for inputs, targets in micro_batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten()) / len(micro_batches)
        if sum_first:
            losses.append(loss)
        else:
            loss.backward()
            losses.append(loss.detach())
    if sum_first:  # another legitimate order: one backward through the summed losses
        sum(losses).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf)
    optimizer.step()
    return lr, sum(loss.item() for loss in losses), norm.item()


def train_step_summing_first(*args):
    return train_step(*args, sum_first=True)


def train_step_one_step_ahead(*args):  # the schedule read at step + 1
    return train_step(*args, lr_shift=1)


def train_step_without_zero_grad(*args):  # the previous step's gradients leak into this one
    return train_step(*args, zero_grad=False)


def train_step_one_big_batch(model, optimizer, micro_batches, step, config):  # right numbers, k times the memory
    inputs = torch.cat([x for x, _ in micro_batches])
    targets = torch.cat([y for _, y in micro_batches])
    return train_step(model, optimizer, [(inputs, targets)], step, config)


def train_step_without_autocast(model, optimizer, micro_batches, step, config):
    from dataclasses import replace

    return train_step(model, optimizer, micro_batches, step, replace(config, bf16=False))


def test_train_step_check(capsys):
    passed, stubbed, wrong = run_three(ch08.check_train_step, train_step, train_step_one_step_ahead, capsys)
    for variant in (train_step_summing_first, train_step_without_zero_grad, train_step_one_big_batch,
                    train_step_without_autocast, lambda *args: None):
        ch08.check_train_step(variant)
    summing_first, no_zero_grad, big_batch, no_autocast, nothing = outputs(capsys)
    title = "Exercise 8.5 (one training step)"
    assert passed == summing_first == f"{title}: passed ✓"
    assert stubbed.startswith(f"{title}: not attempted yet")
    assert wrong == f"{title}: not yet ✗ - case 1: step 0 (1 micro-batch, grad_clip=1.0): the learning rate: expected " \
                    "0.125, got 0.25"
    assert no_zero_grad.startswith(f"{title}: not yet ✗ - case 4: step 6 (2 micro-batches, grad_clip=1.0): the "
                                   "gradient norm before clipping: expected")
    assert big_batch == (f"{title}: not yet ✗ - case 2: step 7 (3 micro-batches, grad_clip=0.05): expected 3 forward "
                         "calls, one per micro-batch, got 1")
    assert no_autocast == (f"{title}: not yet ✗ - case 5: step 1 (2 micro-batches, grad_clip=1.0, bf16): a forward "
                           "call ran with bf16 autocast off")
    assert nothing == (f"{title}: not yet ✗ - case 1: step 0 (1 micro-batch, grad_clip=1.0): expected a triple (lr, "
                       "loss, grad_norm), got NoneType")


def test_train_step_second_hint_level(capsys, monkeypatch):
    monkeypatch.setattr(exercises, "_failures", {})  # earlier tests failed this check too
    ch08.check_train_step(train_step_one_step_ahead)
    assert "more:" not in capsys.readouterr().out
    ch08.check_train_step(train_step_one_step_ahead)
    assert "more: each micro-batch's loss" in capsys.readouterr().out


CLAIM = ("train_step reproduces minillm.train's first 20 losses (2 micro-batches, warmup + cosine, clipping at 1.0, "
         "AdamW): max relative |Δ| ≤ 1e-5")


def test_plugged_in_training_step_reproduces_minillm(capsys):
    with use(train_step=train_step):
        assert train_module.train_step is train_step
        assert ch08.end_to_end_train()
    with use(train_step=train_step_summing_first):
        assert ch08.end_to_end_train()
    assert capsys.readouterr().out.splitlines() == [f"your {CLAIM}: ✓"] * 2


def test_wrong_steps_plugged_in_fail_end_to_end(capsys):
    with use(train_step=train_step_one_step_ahead):
        assert not ch08.end_to_end_train()
    with use(train_step=train_step_without_zero_grad):
        assert not ch08.end_to_end_train()
    ahead, no_zero_grad = capsys.readouterr().out.splitlines()
    assert ahead.startswith(f"your {CLAIM}: ✗ - history['lr'] by step: first mismatch at index (0,)")
    assert no_zero_grad.startswith(f"your {CLAIM}: ✗ - history['train_loss'] by step: first mismatch at index")


def test_stub_plugged_in_is_skipped(capsys):
    with use(train_step=stub):
        ch08.end_to_end_train()
    assert capsys.readouterr().out.startswith("plug-in skipped: your train_step (exercise 8.5) is not written yet")


def _reference_losses():
    """Five steps of minillm.train on a tiny GPT: the chapter's loop, through the seam."""
    from minillm.train import TrainConfig, train

    tokens = torch.arange(200) % 31
    config = TrainConfig(steps=5, batch_size=2, block_size=8, grad_accum_steps=2, warmup_steps=1, eval_every=5,
                         eval_windows=1, show_progress=False)
    return torch.tensor(train(ch08._tiny_gpt(seed=0), tokens, tokens, config)["train_loss"])


def test_plug_in_leaves_the_package_unchanged():
    original = train_module.train_step
    before = _reference_losses()
    with use(train_step=train_step_one_step_ahead):
        assert not torch.equal(_reference_losses(), before)
    assert train_module.train_step is original
    with pytest.raises(ZeroDivisionError):
        with use(train_step=train_step):
            1 / 0
    assert train_module.train_step is original
    assert torch.equal(_reference_losses(), before)
