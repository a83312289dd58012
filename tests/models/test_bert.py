"""minillm.models.Bert against HF Transformers' BertModel, built from configs with random weights.

The reference hidden states and pooled outputs come from HF run here: bit for bit against eager attention,
within 1e-5 against sdpa; odd head dims, three segment types, batch > 1 with left and right padding.
"""

import random

import pytest
import torch
import transformers

from hf_reference import randomize, token_batch
from minillm.models import Bert, BertConfig

CONFIGS = {  # BertConfig keywords; "pooler" is BertModel's add_pooling_layer
    "hd5-pooler": dict(vocab_size=37, hidden_size=15, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=23, max_position_embeddings=20, type_vocab_size=3, pooler=True),
    "hd4-no-pooler": dict(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=40, max_position_embeddings=16, layer_norm_eps=1e-5, pooler=False),
}


def hf_bert(attn_implementation="eager", seed=0, pooler=True, **sizes):
    config = transformers.BertConfig(attn_implementation=attn_implementation, **sizes)
    torch.manual_seed(seed)
    return randomize(transformers.BertModel(config, add_pooling_layer=pooler), seed).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    sizes = CONFIGS[request.param]
    eager, sdpa = hf_bert("eager", **sizes), hf_bert("sdpa", **sizes)
    ids, attention_mask = token_batch(sizes["vocab_size"], B=3, T=sizes["max_position_embeddings"] - 1)
    types = torch.randint(0, sizes.get("type_vocab_size", 2), ids.shape, generator=torch.Generator().manual_seed(1))
    return eager, sdpa, Bert.from_hf(eager), ids, attention_mask, types


def test_hidden_states_equal_hf_eager_bit_for_bit(pair):
    eager, _, ours, ids, attention_mask, types = pair
    real = attention_mask.bool()
    for kwargs in (dict(), dict(token_type_ids=types), dict(token_type_ids=types, attention_mask=attention_mask)):
        with torch.no_grad():
            expected, got = eager(ids, **kwargs), ours(ids, **kwargs)
        keep = real if "attention_mask" in kwargs else torch.ones_like(real)
        assert torch.equal(got[keep], expected.last_hidden_state[keep]), (
            f"{sorted(kwargs)}: differs from HF BertModel (eager) by "
            f"{(got - expected.last_hidden_state)[keep].abs().max():.3g}: check post-LN order, the exact GELU, "
            "eps 1e-12 and the order of the embedding sum (word + type, then + position)")
        if ours.pooler is not None:
            assert torch.equal(ours.pool(got), expected.pooler_output), "pool() differs from HF's pooler"


def test_hidden_states_match_hf_sdpa(pair):
    _, sdpa, ours, ids, attention_mask, types = pair
    with torch.no_grad():
        expected = sdpa(ids, attention_mask=attention_mask, token_type_ids=types).last_hidden_state
        got = ours(ids, attention_mask=attention_mask, token_type_ids=types)
    err = (got - expected)[attention_mask.bool()].abs().max().item()
    assert err < 1e-5, f"max|ours - HF sdpa| = {err:.3g}; allowed 1e-5"


def test_to_hf_round_trips(pair):
    eager, _, ours, ids, _, types = pair
    back = ours.to_hf()
    assert isinstance(back, transformers.BertModel) and (back.pooler is None) == (ours.pooler is None)
    with torch.no_grad():
        assert torch.equal(back(ids, token_type_ids=types).last_hidden_state,
                           eager(ids, token_type_ids=types).last_hidden_state)
    assert Bert.from_hf(back).config == ours.config
    assert ours.num_parameters() == sum(p.numel() for p in eager.parameters())


@pytest.mark.parametrize("seed", range(4))
def test_random_configs_equal_hf_eager(seed):
    rng = random.Random(seed)
    heads = rng.randint(1, 4)
    sizes = dict(vocab_size=rng.randint(11, 97), hidden_size=heads * rng.randint(1, 7), num_attention_heads=heads,
                 num_hidden_layers=rng.randint(1, 3), intermediate_size=rng.randint(3, 40),
                 max_position_embeddings=rng.randint(2, 16), type_vocab_size=rng.randint(1, 3))
    hf = hf_bert(seed=seed, **sizes)
    ids, attention_mask = token_batch(sizes["vocab_size"], B=rng.randint(1, 3),
                                      T=rng.randint(1, sizes["max_position_embeddings"]))
    with torch.no_grad():
        got = Bert.from_hf(hf)(ids, attention_mask=attention_mask)
        expected = hf(ids, attention_mask=attention_mask).last_hidden_state
    real = attention_mask.bool()
    assert torch.equal(got[real], expected[real]), f"{sizes}: max|Δ| = {(got - expected)[real].abs().max():.3g}"


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=31, max_seq_len=12, hidden_size=12, num_layers=3, num_heads=3,
                            intermediate_size=20, dropout=0.2))
    ids = torch.randint(0, 31, (2, 12))

    def grads(checkpointing):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        model.pool(model(ids)).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for (name, _), a, b in zip(model.named_parameters(), grads(False), grads(True)):
        assert torch.equal(a, b), f"gradient checkpointing changed the gradient of {name}"


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("key, value, message", [
    ("hidden_act", "gelu_new", "config.hidden_act='gelu_new'"),
    ("attention_probs_dropout_prob", 0.3, "differs from config.hidden_dropout_prob"),
    ("chunk_size_feed_forward", 4, "config.chunk_size_feed_forward=4"),
])
def test_unsupported_hf_config_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        Bert.from_hf(hf_bert(**{**CONFIGS["hd5-pooler"], key: value}))


def test_from_hf_rejects_models_with_heads():
    sizes = {k: v for k, v in CONFIGS["hd5-pooler"].items() if k != "pooler"}
    masked_lm = transformers.BertForMaskedLM(transformers.BertConfig(**sizes))
    with pytest.raises(TypeError, match="pass its encoder, model.bert"):
        Bert.from_hf(masked_lm)


def test_bad_inputs():
    model = Bert(BertConfig(vocab_size=10, max_seq_len=6, hidden_size=8, num_layers=1, num_heads=2,
                            intermediate_size=8, pooler=False))
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_type_ids must be a \(B, T\) tensor .* values in \[0, 2\)"):
        model(ids, token_type_ids=torch.full((2, 4), 2))
    with pytest.raises(ValueError, match="max_seq_len=6"):
        model(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="pooler=False"):
        model.pool(model(ids))
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        BertConfig(hidden_size=8, num_heads=3)
