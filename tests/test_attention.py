"""minillm.attention against torch's scaled_dot_product_attention, nn.MultiheadAttention and HF Mistral.

Expected values come from torch (or HF Transformers) run here, or, for the masks, from their definitions
written out as loops over positions. Every mask kind is checked in float32 and float64, with batch > 1,
odd head dims, queries after cached keys (T_q != T_k) and GQA ratios 1, 2 and 3.
"""

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right

from minillm.attention import (GroupedQueryAttention, MultiHeadAttention, attention_weights, causal_mask,
                               combine_masks, padding_mask, repeat_kv, scaled_dot_product_attention,
                               sliding_window_mask, strided_mask)

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def random_qkv(B, H, H_kv, T_q, T_k, hd, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T_q, hd, generator=g, dtype=dtype)
    k = torch.randn(B, H_kv, T_k, hd, generator=g, dtype=dtype)
    v = torch.randn(B, H_kv, T_k, hd, generator=g, dtype=dtype)
    return q, k, v


def left_padded(lengths, T):
    """A (B, T) 0/1 attention mask with each row's tokens at the end (left padding)."""
    return torch.tensor([[0] * (T - n) + [1] * n for n in lengths])


def torch_sdpa(q, k, v, mask=None):
    return TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))


def assert_matches_sdpa(q, k, v, mask, what):
    ours, theirs = scaled_dot_product_attention(q, k, v, mask), torch_sdpa(q, k, v, mask)
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, torch SDPA gives {tuple(theirs.shape)}"
    err = (ours - theirs).abs().max().item()
    assert err < TOL[q.dtype], f"{what}: max|ours - torch SDPA| = {err:.3g} in {q.dtype} (allowed {TOL[q.dtype]})"


# ---------------------------------------------------------------------- masks from their definitions
def by_definition(T_q, T_k, offset, allowed):
    """The mask written out position by position: query i sits at offset + i, key j at j."""
    return torch.tensor([[allowed(offset + i, j) for j in range(T_k)] for i in range(T_q)])


@pytest.mark.parametrize("T_q, T_k, offset", [(1, 1, 0), (5, 5, 0), (3, 8, 5), (1, 7, 6), (4, 9, 2), (6, 4, 0)])
def test_mask_builders_follow_their_definitions(T_q, T_k, offset):
    cases = {
        "causal_mask": (causal_mask(T_q, T_k, offset), lambda p, j: j <= p),
        "sliding_window_mask(window=3)": (sliding_window_mask(T_q, T_k, 3, offset), lambda p, j: p - 3 < j <= p),
        "sliding_window_mask(window=1)": (sliding_window_mask(T_q, T_k, 1, offset), lambda p, j: j == p),
        "strided_mask(stride=3)": (strided_mask(T_q, T_k, 3, offset),
                                   lambda p, j: j <= p and (p - j < 3 or (p - j) % 3 == 0)),
    }
    for name, (mask, allowed) in cases.items():
        expected = by_definition(T_q, T_k, offset, allowed)
        assert mask.dtype == torch.bool and mask.shape == (T_q, T_k), f"{name}: got {mask.dtype} {tuple(mask.shape)}"
        assert torch.equal(mask, expected), f"{name}, T_q={T_q}, T_k={T_k}, offset={offset}:\n{mask.int()}\n" \
                                            f"expected\n{expected.int()}"


def test_default_offset_puts_the_queries_last_like_torch_causal_lower_right():
    for T_q, T_k in [(1, 6), (3, 6), (6, 6)]:
        assert torch.equal(causal_mask(T_q, T_k), causal_lower_right(T_q, T_k)._materialize()), (
            f"causal_mask({T_q}, {T_k}) must align the triangle bottom-right, as a decoding step after a cache needs")
        assert torch.equal(causal_mask(T_q, T_k), causal_mask(T_q, T_k, offset=T_k - T_q))


def test_sliding_window_wider_than_the_sequence_is_causal():
    assert torch.equal(sliding_window_mask(7, 7, 7), causal_mask(7)), "window >= T must see the whole past"
    assert torch.equal(sliding_window_mask(7, 7, 100), causal_mask(7))


def test_padding_mask_and_combine_masks_broadcast_to_batch_by_queries():
    am = left_padded([4, 2, 0], T=4)
    pad = padding_mask(am)
    assert pad.shape == (3, 1, 1, 4) and pad.dtype == torch.bool
    assert torch.equal(pad[:, 0, 0], am.bool())
    both = combine_masks(causal_mask(4), pad)
    assert both.shape == (3, 1, 4, 4)
    assert torch.equal(both, causal_mask(4) & pad), "combine_masks must be the & of its masks"
    assert torch.equal(padding_mask(am.bool()), padding_mask(am.float())), "0/1 in any dtype is accepted"


# ------------------------------------------------------------------------- attention vs torch SDPA
MASKS = {
    "no mask": lambda T_q, T_k, am: None,
    "causal": lambda T_q, T_k, am: causal_mask(T_q, T_k),
    "padding": lambda T_q, T_k, am: padding_mask(am),
    "sliding window 3": lambda T_q, T_k, am: sliding_window_mask(T_q, T_k, 3),
    "strided 2": lambda T_q, T_k, am: strided_mask(T_q, T_k, 2),
    "sliding + padding": lambda T_q, T_k, am: combine_masks(sliding_window_mask(T_q, T_k, 4), padding_mask(am)),
    "causal + padding": lambda T_q, T_k, am: combine_masks(causal_mask(T_q, T_k), padding_mask(am)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("T_q, T_k", [(9, 9), (3, 10), (1, 7)], ids=["prefill", "chunk-after-cache", "decode"])
def test_every_mask_kind_matches_torch_sdpa(kind, T_q, T_k, dtype):
    q, k, v = random_qkv(B=3, H=4, H_kv=4, T_q=T_q, T_k=T_k, hd=7, dtype=dtype)  # odd head dim
    am = left_padded([T_k, T_k - 2, 1], T_k)
    assert_matches_sdpa(q, k, v, MASKS[kind](T_q, T_k, am), f"{kind} mask, T_q={T_q}, T_k={T_k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_gqa_matches_torch_enable_gqa_and_repeating_by_hand(ratio, dtype):
    H_kv = 2
    q, k, v = random_qkv(B=2, H=H_kv * ratio, H_kv=H_kv, T_q=6, T_k=6, hd=5, dtype=dtype, seed=ratio)
    mask = sliding_window_mask(6, 6, 3)
    assert_matches_sdpa(q, k, v, mask, f"GQA {H_kv * ratio} query heads / {H_kv} kv heads")

    by_hand = scaled_dot_product_attention(q, k.repeat_interleave(ratio, 1), v.repeat_interleave(ratio, 1), mask)
    assert torch.equal(scaled_dot_product_attention(q, k, v, mask), by_hand), (
        "GQA must equal attention over kv heads repeated with repeat_interleave on dim 1")
    assert torch.equal(repeat_kv(k, ratio), k.repeat_interleave(ratio, dim=1))
    for head in range(H_kv * ratio):  # query head h is served by kv head h // ratio
        assert torch.equal(repeat_kv(k, ratio)[:, head], k[:, head // ratio])
    if ratio > 1:
        tiled = scaled_dot_product_attention(q, k.repeat(1, ratio, 1, 1), v.repeat(1, ratio, 1, 1), mask)
        assert (tiled - by_hand).abs().max() > 1e-2, "tiling kv heads must give a different (wrong) answer"


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), H_kv=st.integers(1, 3), ratio=st.integers(1, 3), T_q=st.integers(1, 7),
       cached=st.integers(0, 6), hd=st.integers(1, 9), kind=st.sampled_from(sorted(MASKS)), seed=st.integers(0, 99))
def test_random_shapes_match_torch_sdpa(B, H_kv, ratio, T_q, cached, hd, kind, seed):
    T_k = T_q + cached
    q, k, v = random_qkv(B, H_kv * ratio, H_kv, T_q, T_k, hd, seed=seed)
    am = torch.ones(B, T_k, dtype=torch.long)
    am[0, : seed % T_k] = 0  # left padding of random length in the first row, sometimes all of it
    assert_matches_sdpa(q, k, v, MASKS[kind](T_q, T_k, am), f"{kind}, B={B}, ratio={ratio}, T_q={T_q}, T_k={T_k}")


def test_bfloat16_is_normalised_in_float32_and_close_to_torch():
    q, k, v = random_qkv(2, 4, 2, 8, 8, 16, dtype=torch.bfloat16)
    ours = scaled_dot_product_attention(q, k, v, causal_mask(8))
    exact = torch_sdpa(q.double(), k.double(), v.double(), causal_mask(8))
    assert ours.dtype == torch.bfloat16
    assert (ours.double() - exact).abs().max() < 3e-2, "bf16 attention drifted from the float64 answer"


def test_explicit_scale_matches_torch():
    q, k, v = random_qkv(2, 3, 3, 5, 5, 6)
    ours = scaled_dot_product_attention(q, k, v, causal_mask(5), scale=0.7)
    theirs = TF.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(5), scale=0.7)
    assert (ours - theirs).abs().max() < 1e-13


def test_attention_weights_rows_sum_to_one_and_respect_the_mask():
    q, k, _ = random_qkv(2, 2, 2, 6, 6, 4)
    mask = strided_mask(6, 6, 2)
    weights = attention_weights(q, k, mask)
    assert weights.shape == (2, 2, 6, 6)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 6, dtype=torch.float64))
    assert (weights[..., ~mask] == 0).all(), "a masked key must get exactly zero weight"


def test_torch_is_causal_is_top_left_so_a_chunk_after_a_cache_needs_our_mask():
    q, k, v = random_qkv(1, 2, 2, 3, 8, 4)
    ours = scaled_dot_product_attention(q, k, v, causal_mask(3, 8))
    top_left = TF.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (ours - top_left).abs().max() > 1e-1, "is_causal=True aligns top-left; our default must not"
    assert (ours - TF.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 8))).abs().max() < 1e-13


# ---------------------------------------------------------------------------- all-masked rows
def test_all_masked_rows_give_zeros_like_torch_and_no_nan_in_gradients():
    q, k, v = random_qkv(3, 2, 2, 5, 5, 4)
    am = left_padded([5, 3, 0], T=5)  # row 1: queries 0-1 see only pads; row 2: nothing at all
    mask = combine_masks(causal_mask(5), padding_mask(am))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = scaled_dot_product_attention(q, k, v, mask)
    assert not out.isnan().any(), "a query with every key masked must not produce NaN"
    assert (out[1, :, :2] == 0).all() and (out[2] == 0).all(), "all-masked queries must output zeros"
    assert (out - torch_sdpa(q, k, v, mask)).abs().max() < 1e-13, "torch SDPA also returns zeros there"
    out.sum().backward()
    assert not any(t.grad.isnan().any() for t in (q, k, v)), "NaN leaked into the gradients"
    assert (q.grad[2] == 0).all(), "a query that sees nothing gets no gradient"


def test_gradients_match_central_differences_with_all_masked_rows():
    q, k, v = (t.requires_grad_(True) for t in random_qkv(2, 2, 1, 3, 4, 3))
    mask = combine_masks(causal_mask(3, 4), padding_mask(torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]])))
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask), (q, k, v))


def test_gradients_match_torch_sdpa():
    ours = [t.requires_grad_(True) for t in random_qkv(2, 4, 2, 5, 7, 3)]
    theirs = [t.detach().clone().requires_grad_(True) for t in ours]
    mask = sliding_window_mask(5, 7, 3)
    weights = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    (scaled_dot_product_attention(*ours, mask) * weights).sum().backward()
    (torch_sdpa(*theirs, mask) * weights).sum().backward()
    for name, a, b in zip("qkv", ours, theirs):
        assert (a.grad - b.grad).abs().max() < 1e-12, f"gradient of {name} differs from torch SDPA's"


# ------------------------------------------------------------------------------------- dropout
def test_dropout_is_reproducible_with_a_generator_and_unbiased():
    q, k, v = random_qkv(1, 2, 2, 4, 4, 3)
    mask = causal_mask(4)
    draw = lambda seed: scaled_dot_product_attention(q, k, v, mask, dropout_p=0.3,
                                                     generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1)), "the same generator seed must drop the same weights"
    assert not torch.equal(draw(1), draw(2))
    assert torch.equal(scaled_dot_product_attention(q, k, v, mask, dropout_p=0.0),
                       scaled_dot_product_attention(q, k, v, mask))
    mean = torch.stack([draw(seed) for seed in range(2000)]).mean(0)
    no_dropout = scaled_dot_product_attention(q, k, v, mask)
    assert (mean - no_dropout).abs().max() < 0.1, "dropout must rescale the kept weights by 1 / (1 - p)"


# ------------------------------------------------------------------------------------- modules
def test_multi_head_attention_matches_torch_nn_multiheadattention():
    torch.manual_seed(0)
    C, H, T = 12, 3, 6
    theirs = torch.nn.MultiheadAttention(C, H, bias=True, batch_first=True).double().eval()
    ours = MultiHeadAttention(C, H, bias=True).double()
    q_w, k_w, v_w = theirs.in_proj_weight.detach().chunk(3)
    q_b, k_b, v_b = theirs.in_proj_bias.detach().chunk(3)
    ours.load_state_dict({"q_proj.weight": q_w, "q_proj.bias": q_b, "k_proj.weight": k_w, "k_proj.bias": k_b,
                          "v_proj.weight": v_w, "v_proj.bias": v_b, "o_proj.weight": theirs.out_proj.weight,
                          "o_proj.bias": theirs.out_proj.bias})
    x = torch.randn(2, T, C, dtype=torch.float64)
    mask = sliding_window_mask(T, T, 2)
    expected, _ = theirs(x, x, x, attn_mask=~mask, need_weights=False)  # torch's convention: True = blocked
    assert (ours(x, mask) - expected).abs().max() < 1e-13


def test_gqa_module_equals_mha_with_repeated_kv_projections():
    torch.manual_seed(0)
    C, H, H_kv, hd = 10, 6, 2, 5  # head_dim given explicitly: 6 heads of 5 on a width of 10
    gqa = GroupedQueryAttention(C, H, H_kv, head_dim=hd).double()
    mha = MultiHeadAttention(C, H, head_dim=hd).double()
    widen = lambda w: w.view(H_kv, hd, C).repeat_interleave(H // H_kv, dim=0).reshape(H * hd, C)
    mha.load_state_dict({"q_proj.weight": gqa.q_proj.weight, "o_proj.weight": gqa.o_proj.weight,
                         "k_proj.weight": widen(gqa.k_proj.weight), "v_proj.weight": widen(gqa.v_proj.weight)})
    x = torch.randn(3, 7, C, dtype=torch.float64)
    assert (gqa(x, causal_mask(7)) - mha(x, causal_mask(7))).abs().max() < 1e-13
    assert gqa.k_proj.weight.shape == (H_kv * hd, C), "GQA stores only num_kv_heads key heads"


def test_module_dropout_only_in_training():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(8, 4, 2, dropout=0.5).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    assert torch.equal(attn.eval()(x, causal_mask(5)), attn.eval()(x, causal_mask(5)))
    assert not torch.equal(attn.train()(x, causal_mask(5)), attn.eval()(x, causal_mask(5)))


# --------------------------------------------------------------------------------- HF Mistral
@pytest.fixture(scope="module")
def mistral_attention():
    """Run a tiny eager Mistral (window W) with left padding; capture one layer's attention inputs and outputs."""
    from transformers import MistralConfig, MistralForCausalLM

    W, T = 4, 11
    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=W, max_position_embeddings=64,
                           initializer_range=0.2, attn_implementation="eager", bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    layer = model.model.layers[1].self_attn
    seen = {}
    layer.register_forward_hook(lambda module, args, kwargs, out: seen.update(kwargs, out=out), with_kwargs=True)
    am = left_padded([T, T - 3], T)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 97, (2, T)), attention_mask=am)
    return dict(seen, layer=layer, W=W, T=T, am=am)


def minillm_mistral_attention(seen, window):
    """Reproduce HF's attention from its weights. RoPE is HF's own (it is chapter 06's topic, not ours yet):
    rotating q and k with HF's apply_rotary_pos_emb isolates what this module owns, masks and attention."""
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    ours = GroupedQueryAttention(64, 4, 2)
    ours.load_state_dict(seen["layer"].state_dict())  # same parameter names as HF
    mask = combine_masks(sliding_window_mask(seen["T"], seen["T"], window), padding_mask(seen["am"]))
    with torch.no_grad():
        q, k, v = ours.project_qkv(seen["hidden_states"])
        q, k = apply_rotary_pos_emb(q, k, *seen["position_embeddings"])
        weights = attention_weights(q, k, mask)
        out = ours.project_out(scaled_dot_product_attention(q, k, v, mask))
    return mask, weights, out


def test_sliding_window_mask_is_mistrals(mistral_attention):
    seen, W = mistral_attention, mistral_attention["W"]
    hf_allowed = seen["attention_mask"] == 0  # HF eager adds 0 where allowed, the lowest float elsewhere
    for window in (W - 1, W, W + 1):
        mask, _, _ = minillm_mistral_attention(seen, window)
        same = torch.equal(mask.expand_as(hf_allowed), hf_allowed)
        assert same == (window == W), f"window {window} vs Mistral's sliding_window={W}: masks equal = {same}; " \
                                      "the query at p must see keys p-W+1..p"


def test_mistral_sliding_window_attention_is_reproduced_bit_for_bit(mistral_attention):
    seen, W = mistral_attention, mistral_attention["W"]
    hf_out, hf_weights = seen["out"]
    real = seen["am"].bool()  # HF averages uniformly over all keys for pad queries; we give zeros there
    scale = hf_out[real].abs().max()
    for window in (W - 1, W, W + 1):
        _, weights, out = minillm_mistral_attention(seen, window)
        if window == W:
            assert torch.equal(out[real], hf_out[real]), "attention output must equal HF Mistral eager bit for bit"
            assert torch.equal(weights.transpose(1, 2)[real], hf_weights.transpose(1, 2)[real])
        else:
            relative = ((out[real] - hf_out[real]).abs().max() / scale).item()
            assert relative > 0.05, f"window {window} (W±1) should be far off, relative error only {relative:.3g}"


# ---------------------------------------------------------------------------------- bad inputs
def raises(error, match, fn, *args, **kwargs):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


def test_bad_shapes_name_both_shapes():
    q, k, v = random_qkv(2, 4, 2, 5, 5, 8)
    raises(ValueError, r"q \(2, 4, 5, 8\) and k \(3, 2, 5, 8\)", attention_weights, q, k.repeat(2, 1, 1, 1)[:3])
    raises(ValueError, r"q \(2, 4, 5, 8\) and k \(2, 2, 5, 6\)", attention_weights, q, k[..., :6])
    raises(ValueError, r"q \(2, 4, 5, 8\) has 4 heads.*3 kv heads of k \(2, 3, 5, 8\)", attention_weights, q,
           torch.randn(2, 3, 5, 8, dtype=torch.float64))
    raises(ValueError, r"k \(2, 2, 5, 8\) and v \(2, 2, 4, 8\)", scaled_dot_product_attention, q, k, v[:, :, :4])
    raises(ValueError, r"q must have shape \(B, heads, T, head_dim\), got \(4, 5, 8\)", attention_weights, q[0], k)
    raises(ValueError, r"mask \(5, 4\) does not broadcast.*\(2, 4, 5, 5\)", scaled_dot_product_attention, q, k, v,
           causal_mask(5, 4, offset=0))
    raises(ValueError, r"shape \(B, num_kv_heads, T, head_dim\)", repeat_kv, k[0], 2)


def test_bad_types_and_values():
    q, k, v = random_qkv(1, 2, 2, 3, 3, 4)
    raises(TypeError, "torch.bool tensor.*torch.float64", scaled_dot_product_attention, q, k, v,
           causal_mask(3).double())
    raises(TypeError, "share a dtype", attention_weights, q, k.float())
    raises(TypeError, "floating-point", attention_weights, q.long(), k.long())
    raises(ValueError, r"dropout_p must be in \[0, 1\), got 1.0", scaled_dot_product_attention, q, k, v, dropout_p=1.0)
    raises(ValueError, "n_rep must be >= 1, got 0", repeat_kv, k, 0)


def test_bad_mask_arguments():
    raises(ValueError, "window must be >= 1, got 0", sliding_window_mask, 4, 4, 0)
    raises(TypeError, "window must be an int, got float", sliding_window_mask, 4, 4, 2.0)
    raises(ValueError, "stride must be >= 1, got -1", strided_mask, 4, 4, -1)
    raises(ValueError, "offset must be >= 0, got -1", causal_mask, 3, 3, -1)
    raises(ValueError, "T_q=5 queries cannot be the last positions of T_k=3 keys", causal_mask, 5, 3)
    raises(ValueError, "T_q must be >= 1", causal_mask, 0)
    raises(ValueError, r"shape \(B, T\), got \(4,\)", padding_mask, torch.ones(4))
    raises(ValueError, r"only hold 0 \(padding\) and 1 \(token\), found \[2\]", padding_mask, torch.tensor([[1, 2]]))
    raises(TypeError, "must be a torch.Tensor", padding_mask, [[1, 0]])
    raises(ValueError, r"mask shapes \(3, 3\), \(2, 1, 1, 4\) do not broadcast", combine_masks, causal_mask(3),
           padding_mask(torch.ones(2, 4)))
    raises(TypeError, "torch.bool tensor", combine_masks, causal_mask(3), torch.ones(3, 3))


def test_bad_module_configuration():
    raises(ValueError, r"num_heads=6 is not divisible by num_kv_heads=4.*one of \[1, 2, 3, 6\]",
           GroupedQueryAttention, 24, 6, 4)
    raises(ValueError, "hidden_size=10 is not divisible by num_heads=3; pass head_dim", MultiHeadAttention, 10, 3)
    raises(ValueError, r"dropout must be in \[0, 1\), got 1.5", MultiHeadAttention, 8, 2, dropout=1.5)
    raises(ValueError, r"x must have shape \(B, T, hidden_size=8\), got \(2, 5, 6\)", MultiHeadAttention(8, 2),
           torch.randn(2, 5, 6))
