"""Checks for chapter 07's exercises: HF Transformers' `TopKLogitsWarper` and `TopPLogitsWarper` judge the
filters, `torch.cat` judges the cache append, and `torch.multinomial` with the same seed judges sampling,
all run inside the check."""

import torch

from minillm.exercises import Mismatch, check, expect_equal


def _logit_cases(seed: int) -> list[torch.Tensor]:
    """Awkward logits: one row, a batch, a 3-d batch, ties, negative and large values, an odd vocabulary."""
    g = torch.Generator().manual_seed(seed)
    tied = torch.randn(2, 11, generator=g)
    tied[0, :4] = tied[0].max()  # four equal maxima
    return [torch.randn(1, 10, generator=g), 4.0 * torch.randn(3, 37, generator=g) - 2.0, tied,
            torch.randn(2, 3, 13, generator=g)]


def _expect_same_filter(got, expected: torch.Tensor, what: str) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"{what}: expected a tensor of shape {tuple(expected.shape)}, got {shape}")
    kept, kept_expected = torch.isfinite(got), torch.isfinite(expected)
    expect_equal(kept.int(), kept_expected.int(), what=f"{what}, kept (1) or removed (0)", atol=0, rtol=0)
    expect_equal(got[kept], expected[kept_expected], what=f"{what}, the kept logits (unchanged)", atol=0, rtol=0)


def check_top_k_filter(top_k_filter) -> None:
    """Exercise 7.1: `top_k_filter(logits, k)` keeps the k largest logits of each row, -inf elsewhere."""
    from transformers.generation.logits_process import TopKLogitsWarper  # imported here: it takes seconds

    def case(logits, k):
        def run():
            flat = logits.reshape(-1, logits.size(-1))
            expected = TopKLogitsWarper(top_k=k)(None, flat.clone()).view(logits.shape)
            what = f"top_k_filter(logits {tuple(logits.shape)}, k={k})"
            _expect_same_filter(top_k_filter(logits.clone(), k), expected, what)
        return run

    a, b, tied, c = _logit_cases(71)
    cases = [case(a, 3), case(b, 5), case(tied, 2), case(c, 1), case(a, 10)]
    check("Exercise 7.1 (top-k filter)", cases,
          hint="torch.topk(logits, k, dim=-1).values[..., -1:] is the k-th largest of each row; mask every logit "
               "below it with float('-inf') (ties with it stay, as in HF)")


def check_top_p_filter(top_p_filter) -> None:
    """Exercise 7.2: `top_p_filter(logits, p)` keeps the fewest most-likely tokens whose probabilities sum to
    at least p (always the top one), -inf elsewhere."""
    from transformers.generation.logits_process import TopPLogitsWarper

    def case(logits, p):
        def run():
            flat = logits.reshape(-1, logits.size(-1))
            expected = TopPLogitsWarper(top_p=p)(None, flat.clone()).view(logits.shape)
            what = f"top_p_filter(logits {tuple(logits.shape)}, p={p})"
            _expect_same_filter(top_p_filter(logits.clone(), p), expected, what)
        return run

    a, b, tied, c = _logit_cases(72)
    cases = [case(a, 0.9), case(b, 0.5), case(b, 0.05), case(tied, 0.7), case(c, 0.8)]
    check("Exercise 7.2 (top-p filter)", cases,
          hint="sort the logits ascending, softmax, cumsum; drop a token while the cumulative probability is "
               "<= 1 - p, never the last (most likely) one, then scatter back to vocabulary order")


def check_cache_append(cache_append) -> None:
    """Exercise 7.3: `cache_append(K, V, length, k, v)` writes k, v (B, nkv, T, hd) into the preallocated
    buffers K, V (B, nkv, max_len, hd) at positions length..length+T-1 and returns the keys and values of
    all length + T positions."""
    g = torch.Generator().manual_seed(73)

    def case(B, nkv, max_len, hd, length, T):
        def run():
            K, V = torch.randn(B, nkv, max_len, hd, generator=g), torch.randn(B, nkv, max_len, hd, generator=g)
            k, v = torch.randn(B, nkv, T, hd, generator=g), torch.randn(B, nkv, T, hd, generator=g)
            K_before, V_before = K.clone(), V.clone()
            expected_k = torch.cat((K_before[:, :, :length], k), dim=2)  # what attention must see
            expected_v = torch.cat((V_before[:, :, :length], v), dim=2)
            got = cache_append(K, V, length, k, v)
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"expected a pair (keys, values), got {type(got).__name__}")
            what = f"cache_append at length={length} with T={T} new positions"
            expect_equal(got[0], expected_k, what=f"{what}: keys", atol=0, rtol=0)
            expect_equal(got[1], expected_v, what=f"{what}: values", atol=0, rtol=0)
            K_expected = K_before.clone()
            K_expected[:, :, length:length + T] = k  # in place, nothing else touched
            expect_equal(K, K_expected, what=f"{what}: the buffer K afterwards (write the new keys into it)",
                         atol=0, rtol=0)
        return run

    cases = [case(1, 1, 8, 4, 0, 5), case(2, 3, 10, 6, 5, 1), case(3, 2, 7, 2, 6, 1), case(2, 1, 9, 3, 2, 4)]
    check("Exercise 7.3 (append to a KV cache)", cases,
          hint="K[:, :, length:length + T] = k (likewise V), then return K[:, :, :length + T], V[:, :, :length + T]")


def check_sample_next_token(sample_next_token) -> None:
    """Exercise 7.4: `sample_next_token(logits, temperature, generator)` -> ids (B,): argmax when temperature
    is 0, else one draw per row from softmax(logits / temperature) with torch.multinomial and `generator`."""

    def case(B, V, temperature, seed):
        def run():
            logits = 3.0 * torch.randn(B, V, generator=torch.Generator().manual_seed(seed))
            if temperature == 0:
                expected = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
            got = sample_next_token(logits.clone(), temperature, torch.Generator().manual_seed(seed))
            if not isinstance(got, torch.Tensor) or got.shape != (B,):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise Mismatch(f"expected token ids of shape ({B},), got {shape}")
            what = f"ids sampled at temperature {temperature} (seed {seed})"
            expect_equal(got, expected, what=what, atol=0, rtol=0)
        return run

    cases = [case(3, 20, 0.0, 1), case(4, 50, 1.0, 2), case(2, 7, 0.5, 3), case(5, 31, 2.0, 4)]
    check("Exercise 7.4 (sample with temperature)", cases,
          hint="temperature 0: logits.argmax(-1); otherwise probs = softmax(logits / temperature, dim=-1) and "
               "torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]")
