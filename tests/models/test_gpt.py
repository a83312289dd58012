"""minillm.models.GPT against HF Transformers' GPT2LMHeadModel, built from configs with random weights.

The reference logits come from HF run here: bit for bit (`torch.equal`) against eager attention, within
1e-5 against sdpa. Configs have odd head dims (5, 3), vocabularies that are not powers of two, an MLP width
that is not 4C, and batch > 1 with left and right padding.
"""

import random

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from hf_reference import gpt2, token_batch
from minillm.models import GPT, GPTConfig
from minillm.models.hf import from_hf

CONFIGS = {  # GPT2Config keywords
    "hd5": dict(vocab_size=37, n_positions=16, n_embd=15, n_layer=2, n_head=3),
    "hd3-n_inner": dict(vocab_size=101, n_positions=20, n_embd=12, n_layer=3, n_head=4, n_inner=23),
    "one-head": dict(vocab_size=50, n_positions=12, n_embd=16, n_layer=1, n_head=1, layer_norm_epsilon=1e-4),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(HF eager model, HF sdpa model, our GPT from the eager one, batch ids, attention mask)."""
    sizes = CONFIGS[request.param]
    eager, sdpa = gpt2("eager", **sizes), gpt2("sdpa", **sizes)
    ids, attention_mask = token_batch(sizes["vocab_size"], B=3, T=sizes["n_positions"] - 1)
    return eager, sdpa, GPT.from_hf(eager), ids, attention_mask


def test_logits_equal_hf_eager_bit_for_bit(pair):
    eager, _, ours, ids, _ = pair
    with torch.no_grad():
        expected, got = eager(ids).logits, ours(ids)
    assert got.shape == expected.shape, f"logits shape {tuple(got.shape)}, HF gives {tuple(expected.shape)}"
    assert torch.equal(got, expected), (
        f"GPT logits differ from HF GPT2LMHeadModel (eager) by {(got - expected).abs().max():.3g}; anything "
        "nonzero means an op differs: check gelu_new (torch.pow(x, 3.0), not F.gelu), LayerNorm eps, the "
        "Conv1D transposes, and that k is made contiguous as HF's cache does")


@pytest.mark.parametrize("seed", range(6))
def test_random_configs_equal_hf_eager(seed):
    rng = random.Random(seed)
    heads, head_dim = rng.randint(1, 4), rng.randint(1, 7)
    sizes = dict(vocab_size=rng.randint(11, 97), n_positions=rng.randint(4, 19), n_embd=heads * head_dim,
                 n_layer=rng.randint(1, 3), n_head=heads, n_inner=rng.choice([None, rng.randint(3, 30)]))
    hf = gpt2(seed=seed, **sizes)
    ids, attention_mask = token_batch(sizes["vocab_size"], B=rng.randint(1, 3), T=rng.randint(1, sizes["n_positions"]))
    ours = GPT.from_hf(hf)
    with torch.no_grad():
        got, expected = ours(ids, attention_mask=attention_mask), hf(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert torch.equal(got[real], expected[real]), f"{sizes}: max|Δ| = {(got - expected)[real].abs().max():.3g}"


def test_logits_match_hf_sdpa(pair):
    _, sdpa, ours, ids, _ = pair
    with torch.no_grad():
        expected, got = sdpa(ids).logits, ours(ids)
    err = (got - expected).abs().max().item()
    assert err < 1e-5, f"max|ours - HF sdpa| = {err:.3g} (logits up to {expected.abs().max():.2f}); allowed 1e-5"


def test_padded_batch_matches_hf_on_every_real_token(pair):
    eager, sdpa, ours, ids, attention_mask = pair
    real = attention_mask.bool()  # pad queries see no key under left padding: their logits mean nothing
    with torch.no_grad():
        got = ours(ids, attention_mask=attention_mask)
        expected_eager = eager(ids, attention_mask=attention_mask).logits
        expected_sdpa = sdpa(ids, attention_mask=attention_mask).logits
    assert torch.equal(got[real], expected_eager[real]), (
        f"with padding, logits differ from HF eager by {(got - expected_eager)[real].abs().max():.3g}: pad keys "
        "must be hidden from every query (padding_mask & causal_mask), positions still count from column 0")
    err = (got - expected_sdpa)[real].abs().max().item()
    assert err < 1e-5, f"with padding, max|ours - HF sdpa| = {err:.3g} on real tokens; allowed 1e-5"


def test_gradients_equal_hf_eager(pair):
    eager, _, _, ids, _ = pair
    ours = GPT.from_hf(eager)
    eager.zero_grad(set_to_none=True)
    eager(ids).logits.square().mean().backward()
    ours(ids).square().mean().backward()
    theirs = dict(eager.named_parameters())
    conv1d = {f"{n}.weight" for n, m in eager.named_modules() if isinstance(m, Conv1D)}  # stored (in, out)
    for name, p in ours.named_parameters():
        expected = theirs[name].grad.t() if name in conv1d else theirs[name].grad
        assert torch.equal(p.grad, expected), f"gradient of {name} differs from HF's"


def test_weight_layout_survives_dtype_round_trip_and_loading(pair, tmp_path):
    eager, _, ours, ids, _ = pair
    moved = GPT.from_hf(eager).to(torch.float64).to(torch.float32)
    moved.save_pretrained(tmp_path)
    reloaded = GPT.from_pretrained(tmp_path)
    for model in (moved, reloaded):
        w = model.transformer.h[0].mlp.c_fc.weight
        assert w.stride() == (1, w.size(0)), f"c_fc.weight lost GPT-2's (in, out) memory layout: strides {w.stride()}"
        with torch.no_grad():
            assert torch.equal(model(ids), eager(ids).logits)


def test_parameter_count_equals_hf(pair):
    eager, _, ours, _, _ = pair
    assert ours.num_parameters() == sum(p.numel() for p in eager.parameters())
    assert ours.lm_head.weight is ours.transformer.wte.weight, "lm_head must be tied to the token embedding"


def test_to_hf_round_trips(pair):
    eager, _, ours, ids, _ = pair
    back = ours.to_hf()
    assert isinstance(back, transformers.GPT2LMHeadModel) and not back.training
    with torch.no_grad():
        assert torch.equal(back(ids).logits, eager(ids).logits), "to_hf must give back the same HF model"
    again = GPT.from_hf(back)
    assert again.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{name} changed in the round trip GPT -> HF -> GPT"


def test_own_model_exports_to_hf():
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=29, max_seq_len=9, hidden_size=14, num_layers=2, num_heads=2, dropout=0.1)).eval()
    hf = ours.to_hf()
    assert hf.config.attn_pdrop == hf.config.resid_pdrop == hf.config.embd_pdrop == 0.1
    assert hf.config._attn_implementation == "eager"
    ids = torch.randint(0, 29, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids))
    assert isinstance(from_hf(hf), GPT)


# ---------------------------------------------------------------------------------- unsupported configs
@pytest.mark.parametrize("key, value", [
    ("activation_function", "gelu"),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("scale_attn_weights", False),
    ("tie_word_embeddings", False),
    ("attn_pdrop", 0.3),
    ("embd_pdrop", 0.0),
])
def test_unsupported_hf_config_names_the_key(key, value):
    hf = gpt2(**CONFIGS["hd5"], **{key: value})
    with pytest.raises(ValueError, match=f"config.{key}="):
        GPT.from_hf(hf)


def test_from_hf_rejects_other_models():
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        GPT.from_hf(torch.nn.Linear(2, 2))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="use Llama.from_hf"):
        GPT.from_hf(llama)


# -------------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_identical_gradients_and_saves_less():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, max_seq_len=12, hidden_size=12, num_layers=3, num_heads=3, dropout=0.2))
    ids = torch.randint(0, 31, (2, 12))

    def step(checkpointing):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        saved = []
        torch.manual_seed(1)  # dropout draws the same masks, and checkpointing replays them
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved)

    plain, saved_plain = step(False)
    checkpointed, saved_checkpointed = step(True)
    for (name, _), a, b in zip(model.named_parameters(), plain, checkpointed):
        assert torch.equal(a, b), f"gradient checkpointing changed the gradient of {name}"
    # Inside a checkpointed block torch's own hooks take over: the blocks' activations are not kept.
    assert saved_checkpointed < saved_plain / 2, (saved_checkpointed, saved_plain)


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    return GPT(GPTConfig(vocab_size=10, max_seq_len=6, hidden_size=8, num_layers=1, num_heads=2)).eval()


@pytest.mark.parametrize("make_input, error, message", [
    (lambda: torch.zeros(2, 3), TypeError, "integer tensor"),
    (lambda: [[1, 2, 3]], TypeError, "integer tensor"),
    (lambda: torch.tensor([1, 2, 3]), ValueError, r"shape \(B, T\)"),
    (lambda: torch.tensor([[1, 10]]), ValueError, r"token id 10 is outside the vocabulary \[0, 10\)"),
    (lambda: torch.tensor([[-1, 2]]), ValueError, "token id -1"),
    (lambda: torch.zeros(1, 7, dtype=torch.long), ValueError, "max_seq_len=6"),
])
def test_bad_input_ids(tiny, make_input, error, message):
    with pytest.raises(error, match=message):
        tiny(make_input())


def test_bad_attention_mask(tiny):
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must be a \(B, T\) tensor"):
        tiny(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="may only hold 0"):
        tiny(ids, attention_mask=torch.full((2, 4), 2))


@pytest.mark.parametrize("fields, error, message", [
    (dict(hidden_size=10, num_heads=3), ValueError, "divisible by num_heads=3"),
    (dict(num_layers=0), ValueError, "num_layers must be >= 1"),
    (dict(vocab_size=10.0), TypeError, "vocab_size must be an int"),
    (dict(dropout=1.0), ValueError, r"dropout .* \[0, 1\)"),
    (dict(intermediate_size=0), ValueError, "intermediate_size must be >= 1"),
])
def test_bad_config(fields, error, message):
    with pytest.raises(error, match=message):
        GPTConfig(**{**dict(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2), **fields})
    with pytest.raises(TypeError, match="needs a GPTConfig"):
        GPT(dict(vocab_size=10))
