"""Chapter 05's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import torch

from minillm.exercises import ch05
from exercise_helpers import stub, outputs


def positions(T_q, T_k, offset):
    return torch.arange(offset, offset + T_q)[:, None], torch.arange(T_k)[None, :]  # (T_q, 1), (1, T_k)


# --- 5.1 causal mask ------------------------------------------------------------------------------


def causal_mask(T_q, T_k, offset):
    query, key = positions(T_q, T_k, offset)
    return key <= query


def causal_mask_ignoring_offset(T_q, T_k, offset):  # torch's is_causal alignment: top-left
    return torch.ones(T_q, T_k, dtype=torch.bool).tril()


def test_causal_mask_check(capsys):
    ch05.check_causal_mask(causal_mask)
    ch05.check_causal_mask(stub)
    ch05.check_causal_mask(causal_mask_ignoring_offset)
    ch05.check_causal_mask(lambda T_q, T_k, offset: causal_mask(T_q, T_k, offset).int())
    passed, stubbed, wrong, not_bool = outputs(capsys)
    assert passed == "Exercise 5.1 (causal mask): passed ✓"
    assert stubbed.startswith("Exercise 5.1 (causal mask): not attempted yet")
    assert wrong == ("Exercise 5.1 (causal mask): not yet ✗ - case 2: causal_mask(3, 7, offset=4), entry "
                     "[query, key] (1 = may attend): first mismatch at index (0, 1): expected 1, got 0")
    assert "expected a torch.bool tensor (True = may attend), got torch.int32" in not_bool


# --- 5.2 sliding-window mask ----------------------------------------------------------------------


def sliding_window_mask(T_q, T_k, window, offset):
    query, key = positions(T_q, T_k, offset)
    return (key <= query) & (key > query - window)


def sliding_window_mask_one_too_wide(T_q, T_k, window, offset):
    query, key = positions(T_q, T_k, offset)
    return (key <= query) & (key >= query - window)


def test_sliding_window_mask_check(capsys):
    ch05.check_sliding_window_mask(sliding_window_mask)
    ch05.check_sliding_window_mask(stub)
    ch05.check_sliding_window_mask(sliding_window_mask_one_too_wide)
    passed, stubbed, wrong = outputs(capsys)
    assert passed == "Exercise 5.2 (sliding-window mask): passed ✓"
    assert "not attempted yet" in stubbed
    assert wrong == ("Exercise 5.2 (sliding-window mask): not yet ✗ - case 1: sliding_window_mask(8, 8, window=3, "
                     "offset=0), entry [query, key] (1 = may attend): first mismatch at index (3, 0): "
                     "expected 0, got 1")


# --- 5.3 repeat_kv --------------------------------------------------------------------------------


def repeat_kv(x, n_rep):
    B, nkv, T, hd = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, T, hd).reshape(B, nkv * n_rep, T, hd)


def test_repeat_kv_check(capsys):
    ch05.check_repeat_kv(repeat_kv)
    ch05.check_repeat_kv(stub)
    ch05.check_repeat_kv(lambda x, n_rep: x.repeat(1, n_rep, 1, 1))  # tiles: head j goes to j, j + nkv, ...
    ch05.check_repeat_kv(lambda x, n_rep: x)
    passed, stubbed, tiled, unchanged = outputs(capsys)
    assert passed == "Exercise 5.3 (repeat_kv): passed ✓"
    assert "not attempted yet" in stubbed
    assert tiled.startswith("Exercise 5.3 (repeat_kv): not yet ✗ - case 1: repeat_kv(x of shape (1, 2, 3, 4), "
                            "n_rep=2): first mismatch at index (0, 1, 0, 0)")
    assert "expected shape (1, 4, 3, 4), got shape (1, 2, 3, 4)" in unchanged


# --- 5.4 attention with a mask --------------------------------------------------------------------


def attention(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    exp = torch.exp(scores - torch.where(torch.isinf(row_max), 0.0, row_max))
    total = exp.sum(dim=-1, keepdim=True)
    return (exp / torch.where(total == 0, 1.0, total)) @ v


def attention_naive_softmax(q, k, v, mask):  # exp overflows to inf for large scores: inf / inf = nan
    exp = torch.exp((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))) * mask
    return (exp / exp.sum(dim=-1, keepdim=True)) @ v


def attention_nan_when_nothing_is_visible(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def test_masked_attention_check(capsys):
    ch05.check_masked_attention(attention)
    ch05.check_masked_attention(stub)
    ch05.check_masked_attention(attention_naive_softmax)
    ch05.check_masked_attention(attention_nan_when_nothing_is_visible)
    passed, stubbed, overflow, all_masked = outputs(capsys)
    assert passed == "Exercise 5.4 (attention with a mask): passed ✓"
    assert "not attempted yet" in stubbed
    assert overflow.startswith("Exercise 5.4 (attention with a mask): not yet ✗ - case 3:")
    assert "exp overflows unless stable" in overflow and "got nan" in overflow
    assert all_masked.startswith("Exercise 5.4 (attention with a mask): not yet ✗ - case 4:")
    assert "some queries see no key at all" in all_masked and "got nan" in all_masked
