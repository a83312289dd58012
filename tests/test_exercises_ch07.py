"""Chapter 07's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import torch

from minillm.exercises import ch07
from exercise_helpers import stub, outputs


# --- 7.1 top-k ------------------------------------------------------------------------------------


def top_k_filter(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_k_filter_one_too_many(logits, k):  # keeps k + 1 tokens: an off-by-one in the threshold
    kth = torch.topk(logits, min(k + 1, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def test_top_k_check(capsys):
    ch07.check_top_k_filter(top_k_filter)
    ch07.check_top_k_filter(stub)
    ch07.check_top_k_filter(top_k_filter_one_too_many)
    passed, stubbed, wrong = outputs(capsys)
    assert passed == "Exercise 7.1 (top-k filter): passed ✓"
    assert stubbed.startswith("Exercise 7.1 (top-k filter): not attempted yet")
    assert wrong.startswith("Exercise 7.1 (top-k filter): not yet ✗ - case 1: top_k_filter(logits (1, 10), k=3), "
                            "kept (1) or removed (0): first mismatch at index")


# --- 7.2 top-p ------------------------------------------------------------------------------------


def top_p_filter(logits, p):
    sorted_logits, order = torch.sort(logits, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def top_p_filter_without_the_crossing_token(logits, p):  # stops *before* reaching p: one token too few
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative > p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def test_top_p_check(capsys):
    ch07.check_top_p_filter(top_p_filter)
    ch07.check_top_p_filter(stub)
    ch07.check_top_p_filter(top_p_filter_without_the_crossing_token)
    passed, stubbed, wrong = outputs(capsys)
    assert passed == "Exercise 7.2 (top-p filter): passed ✓"
    assert stubbed.startswith("Exercise 7.2 (top-p filter): not attempted yet")
    assert wrong.startswith("Exercise 7.2 (top-p filter): not yet ✗ - case 1: top_p_filter(logits (1, 10), p=0.9), "
                            "kept (1) or removed (0): first mismatch at index")


# --- 7.3 cache append -----------------------------------------------------------------------------


def cache_append(K, V, length, k, v):
    T = k.size(2)
    K[:, :, length:length + T] = k
    V[:, :, length:length + T] = v
    return K[:, :, :length + T], V[:, :, :length + T]


def cache_append_without_storing(K, V, length, k, v):  # right answer now, but the next step forgets it
    return torch.cat((K[:, :, :length], k), dim=2), torch.cat((V[:, :, :length], v), dim=2)


def cache_append_at_the_start(K, V, length, k, v):  # overwrites position 0 instead of appending
    T = k.size(2)
    K[:, :, :T], V[:, :, :T] = k, v
    return K[:, :, :length + T], V[:, :, :length + T]


def test_cache_append_check(capsys):
    ch07.check_cache_append(cache_append)
    ch07.check_cache_append(stub)
    ch07.check_cache_append(cache_append_without_storing)
    ch07.check_cache_append(cache_append_at_the_start)
    passed, stubbed, not_stored, at_start = outputs(capsys)
    assert passed == "Exercise 7.3 (append to a KV cache): passed ✓"
    assert stubbed.startswith("Exercise 7.3 (append to a KV cache): not attempted yet")
    assert not_stored.startswith("Exercise 7.3 (append to a KV cache): not yet ✗ - case 1: cache_append at "
                                 "length=0 with T=5 new positions: the buffer K afterwards")
    assert at_start.startswith("Exercise 7.3 (append to a KV cache): not yet ✗ - case 2: cache_append at "
                               "length=5 with T=1 new positions: keys: first mismatch")


# --- 7.4 sampling ---------------------------------------------------------------------------------


def sample_next_token(logits, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def sample_multiplying_by_temperature(logits, temperature, generator):  # T * logits: the inverse effect
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits * temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def test_sample_next_token_check(capsys):
    ch07.check_sample_next_token(sample_next_token)
    ch07.check_sample_next_token(stub)
    ch07.check_sample_next_token(sample_multiplying_by_temperature)
    ch07.check_sample_next_token(lambda logits, t, g: logits.argmax(-1, keepdim=True))
    passed, stubbed, wrong, bad_shape = outputs(capsys)
    assert passed == "Exercise 7.4 (sample with temperature): passed ✓"
    assert stubbed.startswith("Exercise 7.4 (sample with temperature): not attempted yet")
    assert wrong.startswith("Exercise 7.4 (sample with temperature): not yet ✗ - case 3: ids sampled at "
                            "temperature 0.5 (seed 3): first mismatch at index")
    assert bad_shape == ("Exercise 7.4 (sample with temperature): not yet ✗ - case 1: expected token ids of "
                         "shape (3,), got (3, 1)")
