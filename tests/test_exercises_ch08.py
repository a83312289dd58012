"""Chapter 08's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import torch

from minillm.exercises import ch08
from exercise_helpers import stub, outputs


# --- 8.1 warmup + cosine ----------------------------------------------------------------------------


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
    assert passed == "Exercise 8.1 (warmup + cosine): passed ✓"
    assert stubbed.startswith("Exercise 8.1 (warmup + cosine): not attempted yet")
    assert wrong.startswith("Exercise 8.1 (warmup + cosine): not yet ✗ - case 1: lr_at(0, max_lr=0.001, min_lr=0.0001, "
                            "warmup_steps=3, total_steps=12): expected 0.00025, got 0")


# --- 8.2 get_batch ----------------------------------------------------------------------------------


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
    assert passed == "Exercise 8.2 (get_batch): passed ✓"
    assert stubbed.startswith("Exercise 8.2 (get_batch): not attempted yet")
    assert wrong.startswith("Exercise 8.2 (get_batch): not yet ✗ - case 1: get_batch(tokens of length 50, "
                            "batch_size=4, block_size=8) targets: first mismatch at index (0, 0)")
    assert "expected a pair (inputs, targets), got Tensor" in not_pair


# --- 8.3 clip by global norm ------------------------------------------------------------------------


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
    assert passed == "Exercise 8.3 (clip by global norm): passed ✓"
    assert stubbed.startswith("Exercise 8.3 (clip by global norm): not attempted yet")
    assert wrong.startswith("Exercise 8.3 (clip by global norm): not yet ✗ - case 1: clipped gradient 0 "
                            "(max_norm=1.0): first mismatch at index")


# --- 8.4 unigram baseline ---------------------------------------------------------------------------


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
    assert passed == "Exercise 8.4 (unigram baseline): passed ✓"
    assert stubbed.startswith("Exercise 8.4 (unigram baseline): not attempted yet")
    assert wrong.startswith("Exercise 8.4 (unigram baseline): not yet ✗ - case 1: unigram_loss(100 train tokens, "
                            "30 targets, vocab_size=10): expected")
