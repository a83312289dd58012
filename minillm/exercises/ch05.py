"""Checks for chapter 05's exercises: torch builds every expected mask (`tril`), repeats kv heads
(`repeat_interleave`) and computes attention (`F.scaled_dot_product_attention`) inside the check."""

import torch
import torch.nn.functional as TF

from minillm.exercises import Mismatch, check, expect_equal


def _expect_bool_mask(got, expected: torch.Tensor, what: str) -> None:
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
        kind = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"{what}: expected a torch.bool tensor (True = may attend), got {kind}")
    expect_equal(got, expected, what=f"{what}, entry [query, key] (1 = may attend)")


def check_causal_mask(causal_mask) -> None:
    """Exercise 5.1: `causal_mask(T_q, T_k, offset)`, query i at absolute position offset + i, key j at j."""

    def case(T_q, T_k, offset):
        def run():
            expected = torch.ones(T_q, T_k, dtype=torch.bool).tril(diagonal=offset)
            _expect_bool_mask(causal_mask(T_q, T_k, offset), expected, f"causal_mask({T_q}, {T_k}, offset={offset})")
        return run

    cases = [case(4, 4, 0), case(3, 7, 4), case(1, 6, 5), case(2, 6, 1)]
    check("Exercise 5.1 (causal mask)", cases,
          hint="compare positions: a column of query positions torch.arange(offset, offset + T_q)[:, None] "
               "against a row of key positions torch.arange(T_k)[None, :]; allowed where key <= query")


def check_sliding_window_mask(sliding_window_mask) -> None:
    """Exercise 5.2: `sliding_window_mask(T_q, T_k, window, offset)`: the query at p sees keys p-window+1..p."""

    def case(T_q, T_k, window, offset):
        def run():
            ones = torch.ones(T_q, T_k, dtype=torch.bool)
            expected = ones.tril(diagonal=offset) & ~ones.tril(diagonal=offset - window)
            got = sliding_window_mask(T_q, T_k, window, offset)
            _expect_bool_mask(got, expected, f"sliding_window_mask({T_q}, {T_k}, window={window}, offset={offset})")
        return run

    cases = [case(8, 8, 3, 0), case(3, 10, 4, 7), case(6, 6, 1, 0), case(5, 5, 9, 0), case(1, 9, 4, 8)]
    check("Exercise 5.2 (sliding-window mask)", cases,
          hint="start from the causal mask and also require key > query - window: exactly `window` keys, "
               "the query's own position included (window=1 sees only itself)")


def check_repeat_kv(repeat_kv) -> None:
    """Exercise 5.3: `repeat_kv(x, n_rep)`: (B, nkv, T, hd) -> (B, nkv * n_rep, T, hd), kv head j serving
    query heads j*n_rep .. j*n_rep + n_rep - 1; then attention with it must equal torch's GQA."""
    g = torch.Generator().manual_seed(53)

    def case(B, nkv, T, hd, n_rep):
        q = torch.randn(B, nkv * n_rep, T, hd, generator=g, dtype=torch.float64)
        k, v = (torch.randn(B, nkv, T, hd, generator=g, dtype=torch.float64) for _ in range(2))

        def run():
            what = f"repeat_kv(x of shape {(B, nkv, T, hd)}, n_rep={n_rep})"
            expect_equal(repeat_kv(k, n_rep), torch.repeat_interleave(k, n_rep, dim=1), what=what, atol=0, rtol=0)
            expected = TF.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            got = TF.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep))
            expect_equal(got, expected, what="attention with your repeated heads vs torch's enable_gqa", atol=1e-12)
        return run

    cases = [case(1, 2, 3, 4, 2), case(2, 3, 5, 2, 3), case(1, 4, 2, 3, 1), case(2, 1, 4, 5, 4)]
    check("Exercise 5.3 (repeat_kv)", cases,
          hint="each kv head's copies must sit next to each other: torch.repeat_interleave on dim 1, or "
               "x[:, :, None].expand(B, nkv, n_rep, T, hd).reshape(...); x.repeat(1, n_rep, 1, 1) tiles instead")


def check_masked_attention(attention) -> None:
    """Exercise 5.4: `attention(q, k, v, mask)` with a stable softmax and zeros for queries that see no key,
    judged by `torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)`."""
    g = torch.Generator().manual_seed(54)

    def case(B, H, T_q, T_k, hd, make_mask, spread=1.0, why=""):
        q = torch.randn(B, H, T_q, hd, generator=g) * spread
        k, v = (torch.randn(B, H, T_k, hd, generator=g) * spread for _ in range(2))
        mask = make_mask(B, T_q, T_k)

        def run():
            expected = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            got = attention(q, k, v, mask)
            expect_equal(got, expected, what=f"attention, q {tuple(q.shape)}, k {tuple(k.shape)}{why}",
                         atol=1e-5, rtol=1e-4)
        return run

    def causal(B, T_q, T_k):
        return torch.ones(T_q, T_k, dtype=torch.bool).tril(diagonal=T_k - T_q)

    def causal_and_padding(B, T_q, T_k):
        lengths = torch.tensor([T_k, T_k - 2, 0])[:B]  # left padding; the last sequence is all padding
        real = torch.arange(T_k)[None, :] >= (T_k - lengths)[:, None]  # (B, T_k)
        return causal(B, T_q, T_k) & real[:, None, None, :]  # (B, 1, T_q, T_k)

    cases = [case(2, 3, 5, 5, 4, causal),
             case(1, 2, 3, 7, 5, causal, why=" (3 queries after 4 cached keys)"),
             case(1, 2, 4, 4, 8, causal, spread=12.0, why=" (scores in the hundreds: exp overflows unless stable)"),
             case(3, 2, 4, 4, 6, causal_and_padding, why=" (left padding: some queries see no key at all)")]
    check("Exercise 5.4 (attention with a mask)", cases,
          hint="scores = q @ k.transpose(-2, -1) / sqrt(hd); masked_fill(~mask, -inf); subtract the row max "
               "(use 0 where the whole row is -inf), exp, divide by the row sum (or 1 where it is 0); then @ v")
