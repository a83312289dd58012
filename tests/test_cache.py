"""minillm.cache.KVCache inside the models, against HF Transformers' DynamicCache on the same weights.

References run here: HF eager models (tests/models/hf_reference.py) with their own cache, and our own model
without a cache. A prefill then single-token steps must give HF's cached logits bit for bit, and the tensors
kept in our buffers must be exactly HF's `cache.layers[i].keys` / `.values` (for Mistral's window: the last
W - 1 of them, as in `DynamicSlidingWindowLayer`).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "models"))
from hf_reference import gpt2, llama  # noqa: E402

from minillm.cache import KVCache  # noqa: E402
from minillm.models import GPT, Llama  # noqa: E402

V = 97
MODELS = {  # name -> (HF builder, keywords, our class)
    "gpt2": (gpt2, dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64), GPT),
    "llama-gqa": (llama, dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), Llama),
    "mistral-w5": (llama, dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                               sliding_window=5), Llama),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    build, sizes, cls = MODELS[request.param]
    hf = build(**sizes)
    return hf, cls.from_hf(hf).eval()


def ids_of(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_prefill_and_decode_steps_equal_hf_cached_logits_bit_for_bit(pair):
    hf, ours = pair
    ids = ids_of(2, 12)
    cache = ours.make_cache(2)
    with torch.no_grad():
        out = hf(ids[:, :6], use_cache=True)
        hf_cache = out.cache
        assert torch.equal(ours(ids[:, :6], cache=cache), out.logits), "prefill logits differ from HF's"
        for t in range(6, 12):  # one token at a time, past the window for mistral-w5
            out = hf(ids[:, t:t + 1], cache=hf_cache, use_cache=True)
            ours_logits = ours(ids[:, t:t + 1], cache=cache)
            assert torch.equal(ours_logits, out.logits), (
                f"decode step at position {t} differs from HF's cached step: check the positions start at "
                "cache.length and the mask covers the cached keys")
    assert cache.length == 12
    for i, layer in enumerate(hf_cache.layers):
        kept = cache.num_kept()
        assert kept == layer.keys.size(2), f"layer {i}: we keep {kept} keys, HF keeps {layer.keys.size(2)}"
        assert torch.equal(cache.keys[i][:, :, :kept], layer.keys), f"layer {i}: cached keys differ from HF's"
        assert torch.equal(cache.values[i][:, :, :kept], layer.values), f"layer {i}: cached values differ"


def test_cached_steps_equal_a_full_forward_without_cache(pair):
    _, ours = pair
    ids = ids_of(3, 15, seed=1)
    cache = ours.make_cache(3, max_len=15)
    with torch.no_grad():
        full = ours(ids)  # (B, T, V), no cache
        chunks = [ours(ids[:, :4], cache=cache), ours(ids[:, 4:9], cache=cache)]  # a prefill, then a chunk
        chunks += [ours(ids[:, t:t + 1], cache=cache) for t in range(9, 15)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5,
                               msg="cached chunks must reproduce the uncached logits of every position")


def test_attention_mask_with_a_cache_covers_the_cached_positions(pair):
    _, ours = pair
    ids = ids_of(2, 10, seed=2)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding in row 1
    cache = ours.make_cache(2)
    with torch.no_grad():
        full = ours(ids, attention_mask=attention_mask)
        first = ours(ids[:, :7], attention_mask=attention_mask[:, :7], cache=cache)
        rest = ours(ids[:, 7:], attention_mask=attention_mask, cache=cache)
    real = attention_mask.bool()
    torch.testing.assert_close(torch.cat((first, rest), dim=1)[real], full[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 11\).*cached"):
        ours(ids[:, :1], attention_mask=attention_mask[:, :1], cache=cache)


def test_sliding_window_cache_keeps_only_the_last_window_minus_one_keys():
    cache = KVCache(num_layers=1, batch_size=1, num_kv_heads=1, head_dim=2, max_len=100, sliding_window=4)
    positions = torch.arange(20.0)[None, None, :, None].expand(1, 1, 20, 2)  # a key that holds its position
    k_all, _ = cache.update(0, positions[:, :, :6], positions[:, :, :6])  # prefill 6
    assert k_all[0, 0, :, 0].tolist() == list(range(6)), "a prefill attends to all of its own keys"
    assert cache.keys[0].shape == (1, 1, 3, 2), "the buffer must hold W - 1 = 3 keys, not max_len"
    for t in range(6, 20):
        k_all, _ = cache.update(0, positions[:, :, t:t + 1], positions[:, :, t:t + 1])
        assert k_all[0, 0, :, 0].tolist() == list(range(t - 3, t + 1)), (
            f"step {t}: the query must see keys t-W+1..t (W = 4), in position order")
    assert cache.length == 20 and cache.num_kept() == 3


def test_reset_cache_gives_the_same_result_as_a_fresh_one(pair):
    _, ours = pair
    ids, other = ids_of(2, 9, seed=3), ids_of(2, 13, seed=4)

    def run(cache, ids):
        with torch.no_grad():
            logits = [ours(ids[:, :5], cache=cache)]
            logits += [ours(ids[:, t:t + 1], cache=cache) for t in range(5, ids.size(1))]
        return torch.cat(logits, dim=1)

    reused = ours.make_cache(2, max_len=16)
    run(reused, other)  # fill it with another text first (longer, so stale keys would sit beyond)
    reused.reset()
    assert reused.length == 0
    assert torch.equal(run(reused, ids), run(ours.make_cache(2, max_len=16), ids)), (
        "after reset() the cache must behave exactly like a new one: reset the per-layer lengths")


def test_exceeding_the_context_length_raises(pair):
    _, ours = pair
    cache = ours.make_cache(1, max_len=8)
    with torch.no_grad():
        ours(ids_of(1, 6), cache=cache)
        with pytest.raises(ValueError, match="context length would be exceeded.*max_len=8"):
            ours(ids_of(1, 3), cache=cache)
    with pytest.raises(ValueError, match="max_len must be an int in .1, max_seq_len=64"):
        ours.make_cache(1, max_len=65)


def test_bad_cache_inputs_name_the_problem(pair):
    _, ours = pair
    ids = ids_of(2, 4)
    with pytest.raises(TypeError, match="cache must be a minillm KVCache"):
        ours(ids, cache=[])
    with pytest.raises(ValueError, match=r"k must have shape \(B=1"):  # batch of the cache is 1, input has 2
        with torch.no_grad():
            ours(ids, cache=ours.make_cache(1))
    cache = KVCache(num_layers=2, batch_size=1, num_kv_heads=2, head_dim=4, max_len=8)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\)"):
        cache.update(2, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(TypeError, match="dtype torch.float64 but the cache holds torch.float32"):
        cache.update(0, torch.zeros(1, 2, 1, 4, dtype=torch.float64), torch.zeros(1, 2, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="must have the same shape"):
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="num_kv_heads must be >= 1"):
        KVCache(num_layers=1, batch_size=1, num_kv_heads=0, head_dim=4, max_len=8)
    ours.gradient_checkpointing = True
    try:
        with pytest.raises(ValueError, match="gradient checkpointing"):
            ours(ids, cache=ours.make_cache(2))
    finally:
        ours.gradient_checkpointing = False
