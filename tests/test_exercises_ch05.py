"""Chapter 05's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the build
exercise's attention, plugged into minillm, gives transformers' logits, and the plug-in leaves nothing behind."""

import math

import pytest
import torch

from minillm import attention as package
from minillm import exercises
from minillm.exercises import ch05, use
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


# --- 5.4 (build) multi-head attention with GQA and masks ----------------------------------------------------

BUILD = "Exercise 5.4 (multi-head attention with GQA and masks)"
CLAIM = "GPT-2 and Llama (GQA) logits with your attention equal transformers' eager logits within the rounding bound"


def widen(x, nh):
    return x.repeat_interleave(nh // x.size(1), dim=1)  # (B, nh, T, hd)


def attention(q, k, v, mask=None):  # written independently of HF's op order: stable softmax by hand, / sqrt(hd)
    k, v = widen(k, q.size(1)), widen(v, q.size(1))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    exp = torch.exp(scores - torch.where(torch.isinf(row_max), 0.0, row_max))
    total = exp.sum(dim=-1, keepdim=True)
    return (exp / torch.where(total == 0, 1.0, total)) @ v


def attention_tiling_kv_heads(q, k, v, mask=None):  # kv head j serves query heads j, j + nkv, ...
    n_rep = q.size(1) // k.size(1)
    return attention(q, k.repeat(1, n_rep, 1, 1), v.repeat(1, n_rep, 1, 1), mask)


def attention_naive_softmax(q, k, v, mask=None):  # exp overflows to inf for large scores: inf / inf = nan
    exp = torch.exp((q @ widen(k, q.size(1)).transpose(-2, -1)) / math.sqrt(q.size(-1)))
    exp = exp if mask is None else exp * mask
    return (exp / exp.sum(dim=-1, keepdim=True)) @ widen(v, q.size(1))


def attention_nan_when_nothing_is_visible(q, k, v, mask=None):
    scores = (q @ widen(k, q.size(1)).transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ widen(v, q.size(1))


def attention_without_scale(q, k, v, mask=None):
    return attention(q * math.sqrt(q.size(-1)), k, v, mask)


def attention_requiring_a_mask(q, k, v, mask):
    return attention(q, k, v, mask.bool())


def test_attention_check(capsys):
    for answer in (attention, stub, attention_tiling_kv_heads, attention_naive_softmax,
                   attention_nan_when_nothing_is_visible, attention_without_scale, attention_requiring_a_mask):
        ch05.check_attention(answer)
    passed, stubbed, tiled, overflow, all_masked, unscaled, no_mask = outputs(capsys)
    assert passed == f"{BUILD}: passed ✓"
    assert stubbed.startswith(f"{BUILD}: not attempted yet")
    assert tiled.startswith(f"{BUILD}: not yet ✗ - case 2: 6 query heads sharing 2 kv heads, 3 queries after 4 cached "
                            "keys, output [batch, head, query, dim]: first mismatch at index (0, 1, 0, 0)"), tiled
    assert overflow.startswith(f"{BUILD}: not yet ✗ - case 4: scores in the hundreds") and "got nan" in overflow
    assert all_masked.startswith(f"{BUILD}: not yet ✗ - case 5: left padding") and "got nan" in all_masked
    assert unscaled.startswith(f"{BUILD}: not yet ✗ - case 1: multi-head (3 heads), causal, output"), unscaled
    assert no_mask == (f"{BUILD}: not yet ✗ - case 3: your code raised AttributeError: 'NoneType' object has no "
                       "attribute 'bool'"), no_mask


def test_attention_hints_are_staged_and_give_no_code(capsys, monkeypatch):
    monkeypatch.setattr(exercises, "_failures", {})  # a fresh learner: no failed run yet
    ch05.check_attention(attention_tiling_kv_heads)
    first = capsys.readouterr().out
    ch05.check_attention(attention_tiling_kv_heads)
    second = capsys.readouterr().out
    assert "hint:" in first and "more:" not in first and "more:" in second
    for text in (first, second):
        assert not any(code in text for code in ("torch.", "masked_fill(", "softmax(", "@", "repeat_interleave")), text


def test_solution_plugged_in_gives_transformers_logits(capsys):
    with use(attention=attention):
        assert ch05.end_to_end_attention()
    out = capsys.readouterr().out  # another op order than HF's: within the bound (bit for bit or not, by CPU)
    assert out.startswith(CLAIM) and out.endswith(": ✓\n"), out


def test_package_attention_is_bit_for_bit(capsys):
    """minillm's own attention runs HF's ops in HF's order: the verdict says so."""
    assert ch05.end_to_end_attention()
    assert capsys.readouterr().out.endswith("and bit for bit (your ops are HF's, in HF's order): ✓\n")


def test_wrong_attention_plugged_in_fails_naming_where(capsys):
    with use(attention=attention_tiling_kv_heads):
        assert not ch05.end_to_end_attention()
    out = capsys.readouterr().out
    assert out.startswith(f"{CLAIM}: ✗ - Llama: Σ|Δ| over the real tokens' logits is "), out
    assert "more than the rounding bound" in out and "the largest |Δ|" in out and "at real token" in out


def test_stub_plugged_in_is_skipped(capsys):
    with use(attention=stub):
        ch05.end_to_end_attention()
    assert capsys.readouterr().out.startswith("plug-in skipped: your attention (exercise 5.4) is not written yet")
    assert package.scaled_dot_product_attention is ch05._MINILLM_ATTENTION


def test_plug_in_leaves_the_package_unchanged():
    from minillm.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=2)).eval()
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model(ids)
    original = package.scaled_dot_product_attention
    with use(attention=attention):
        assert package.scaled_dot_product_attention is attention
        assert torch.allclose(model(ids), before, atol=1e-5), "the plugged-in attention reached the model"
    assert package.scaled_dot_product_attention is original
    assert torch.equal(model(ids), before)
    with pytest.raises(ZeroDivisionError):
        with use(attention=attention):
            raise ZeroDivisionError
    assert package.scaled_dot_product_attention is original
    assert torch.equal(model(ids), before)
