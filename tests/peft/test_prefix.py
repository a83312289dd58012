"""minillm.peft.prefix.PrefixTuning against PEFT 0.21's PrefixTuningConfig model, with the same weights.

References run here: `peft.get_peft_model(hf_twin, PrefixTuningConfig(...))` on HF eager GPT-2 and Llama
(grouped-query attention: 4 query heads, 2 key/value heads) built by tests/models/hf_reference.py, and our
model converted from the same HF weights. The prefix table (and the projection MLP) is copied from PEFT's
`prompt_encoder`. Logits, the prefix's gradients and greedy generation must be equal bit for bit: both sides
run the same ops on the same tensors, the prefix entering as the initial KV cache.

PEFT's own `generate()` ignores the prefix on this stack; generation is therefore compared with a manual
cached loop over HF's base model, and one test documents the bug itself (reference behaviour, not ours).
"""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from hf_reference import gpt2, llama, token_batch  # noqa: E402

from minillm.generation import generate  # noqa: E402
from minillm.models import GPT, Bert, BertConfig, Llama  # noqa: E402
from minillm.peft.prefix import PrefixTuning  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-feature probe logs when peft imports it
peft = pytest.importorskip("peft")
# Deprecations inside PEFT's own code on transformers 5.24 (it passes the prefix as `past_key_values`, and
# get_peft_model asks `is_gradient_checkpointing`); nothing these tests can change.
pytestmark = [pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

P = 5  # virtual tokens
ARCHS = {
    "gpt2": lambda: gpt2(vocab_size=37, n_positions=24, n_embd=12, n_layer=2, n_head=3),
    "llama-gqa": lambda: llama(vocab_size=41, max_position_embeddings=24, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


def twins(arch: str, prefix_projection: bool = False, encoder_hidden_size: int | None = None, seed: int = 0):
    """(PEFT prefix model on the HF twin, our PrefixTuning on the same base weights with PEFT's prefix)."""
    hf = ARCHS[arch]()
    ours = (GPT if arch == "gpt2" else Llama).from_hf(hf)
    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                     prefix_projection=prefix_projection, encoder_hidden_size=encoder_hidden_size)
    reference = peft.get_peft_model(hf, config)
    model = PrefixTuning(ours, P, prefix_projection=prefix_projection, encoder_hidden_size=encoder_hidden_size)
    peft_params = dict(reference.prompt_encoder.default.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(peft_params[name])
    return reference, model


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("projection", [False, True], ids=["table", "projection"])
def test_logits_and_gradients_equal_peft_bit_for_bit(arch, projection):
    reference, model = twins(arch, projection, encoder_hidden_size=7 if projection else None)
    ids, _ = token_batch(37, B=3, T=9)
    expected, got = reference(ids).logits, model(ids)
    assert got.shape == expected.shape == (3, 9, expected.size(-1)), (
        f"logits shape {tuple(got.shape)}, PEFT gives {tuple(expected.shape)}: only the real tokens have rows")
    assert torch.equal(got, expected), (
        f"logits differ from PEFT's by {(got - expected).abs().max():.3g}: the prefix table is laid out "
        "[layer][key, value][head][hd] and the real tokens must start at position P")
    (expected.square().mean() + expected[:, -1].sum()).backward()
    (got.square().mean() + got[:, -1].sum()).backward()
    peft_params = dict(reference.prompt_encoder.default.named_parameters())
    for name, p in trainable(model).items():
        assert torch.equal(p.grad, peft_params[name].grad), (
            f"gradient of {name} differs from PEFT's by {(p.grad - peft_params[name].grad).abs().max():.3g}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_padded_batch_equals_peft_on_real_tokens(arch):
    reference, model = twins(arch)
    ids, attention_mask = token_batch(37, B=3, T=10, seed=1)  # row 1 left-padded, row 2 right-padded
    with torch.no_grad():
        expected = reference(ids, attention_mask=attention_mask).logits
        got = model(ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    assert torch.equal(got[real], expected[real]), (
        f"with padding, logits differ from PEFT's by {(got - expected)[real].abs().max():.3g}: prepend P ones to "
        "the attention mask, the prefix is visible to every real token")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefix_key_values_are_peft_cache_layers(arch):
    reference, model = twins(arch, prefix_projection=True)
    with torch.no_grad():
        cache = reference.get_prompt(2)
        ours = model.prefix_key_values(2)
    assert len(ours) == len(cache.layers), f"{len(ours)} layers of prefix, PEFT has {len(cache.layers)}"
    for i, (k, v) in enumerate(ours):
        assert torch.equal(k, cache.layers[i].keys) and torch.equal(v, cache.layers[i].values), (
            f"layer {i}: prefix keys/values differ from PEFT's DynamicCache (B, nkv, P, hd) = "
            f"{tuple(cache.layers[i].keys.shape)}, ours {tuple(k.shape)}")


def test_prefix_is_gqa_sized_and_initialised_as_peft():
    reference, model = twins("llama-gqa", seed=3)
    config = model.model.config
    kv_dim = config.num_kv_heads * config.head_dim  # 2 kv heads * 4 = 8, not hidden_size 16
    assert model.embedding.weight.shape == (P, 2 * config.num_layers * kv_dim), (
        f"prefix table {tuple(model.embedding.weight.shape)}: one key and one value per layer, each the width "
        f"of the key/value heads (num_kv_heads * head_dim = {kv_dim}), not of the hidden size")
    ours_base, hf_base = Llama.from_hf(ARCHS["llama-gqa"]()), ARCHS["llama-gqa"]()  # the builders seed torch
    torch.manual_seed(3)
    fresh = PrefixTuning(ours_base, P, prefix_projection=True)
    torch.manual_seed(3)
    peft_fresh = peft.get_peft_model(hf_base, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True)).prompt_encoder.default
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(peft_fresh.named_parameters())[name]), (
                f"{name}: with the same seed the initial values should be PEFT's (nn.Embedding N(0, 1), "
                "nn.Linear defaults, created in PEFT's order)")


def test_only_the_prefix_trains():
    _, model = twins("gpt2", prefix_projection=True)
    names = set(trainable(model))
    assert names == {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                     "transform.2.bias"}, f"trainable parameters {sorted(names)}: the base model must be frozen"
    model(token_batch(37, B=2, T=4)[0]).sum().backward()
    assert all(p.grad is None for p in model.model.parameters()), "a base-model parameter received a gradient"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_equals_manual_cached_loop_over_hf(arch):
    reference, model = twins(arch)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    n = 8
    with torch.no_grad():  # the reference: PEFT's prefix as the initial cache, then single cached steps
        cache = reference.get_prompt(2)  # a DynamicCache holding the prefix; HF updates it in place
        logits = reference.base_model(ids, cache=cache).logits
        expected = ids
        for _ in range(n):
            next_id = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            expected = torch.cat((expected, next_id), dim=1)
            logits = reference.base_model(next_id, cache=cache).logits
    got = generate(model, ids, n)
    assert torch.equal(got, expected), f"greedy tokens {got.tolist()}, HF with PEFT's prefix cache {expected.tolist()}"
    assert torch.equal(generate(model, ids, n, use_cache=False), got), (
        "generation without the KV cache (full recompute) must give the same tokens as with it")


def test_reference_bug_peft_generate_ignores_the_prefix():
    """Documents REFERENCE behaviour (PEFT 0.21.2 + transformers 5.24), not minillm's: `PeftModel.generate`
    passes the prefix as `past_key_values`, generate passes its own `cache=`, and the prefix is dropped, so a
    Llama's output is the base model's. Chapter 10 shows this; if this test fails, PEFT fixed the bug: update
    the chapter's section on it and this test."""
    reference, model = twins("llama-gqa")
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        peft_tokens = reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        with reference.disable_adapter():
            base_tokens = reference.base_model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(peft_tokens, base_tokens), "PEFT's generate now differs from the base model's"
    assert not torch.equal(generate(model, ids, 6), peft_tokens), "the prefix should change these tokens"


def test_prefix_uses_up_context():
    _, model = twins("gpt2")  # n_positions 24, P 5: 19 real positions are left
    assert model.config.max_seq_len == 19 and model.model.config.max_seq_len == 24
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, 19\]"):
        model.make_cache(1, 20)
    assert model(torch.zeros(1, 19, dtype=torch.long)).shape == (1, 19, 37)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, None])
def test_num_virtual_tokens_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_virtual_tokens must be an int >= 1"):
        PrefixTuning(GPT.from_hf(ARCHS["gpt2"]()), bad)


def test_bad_arguments_raise_clear_errors():
    base = GPT.from_hf(ARCHS["gpt2"]())
    with pytest.raises(ValueError, match="leaves no room for text"):
        PrefixTuning(base, 24)
    with pytest.raises(ValueError, match="encoder_hidden_size is the width of the prefix_projection MLP"):
        PrefixTuning(base, 3, encoder_hidden_size=8)
    with pytest.raises(ValueError, match="encoder_hidden_size must be an int >= 1"):
        PrefixTuning(base, 3, prefix_projection=True, encoder_hidden_size=0)
    with pytest.raises(TypeError, match="prefix_projection must be True or False"):
        PrefixTuning(base, 3, prefix_projection="yes")
    with pytest.raises(TypeError, match="minillm causal LM"):
        PrefixTuning(Bert(BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                                     intermediate_size=8, max_seq_len=8)), 2)
    model = PrefixTuning(base, 3)
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) tensor"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=[])
    with pytest.raises(ValueError, match="too few for 3 virtual"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=base.make_cache(1, 5))


def test_trains_under_finetune_run_and_only_the_prefix_changes():
    from minillm.finetune import run, task_pairs
    from minillm.pretrained import load_pretrained
    base, tokenizer = load_pretrained()
    frozen = {name: p.clone() for name, p in base.named_parameters()}
    model = PrefixTuning(base, 4, prefix_projection=True)
    start = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    pairs = task_pairs("train")[:4]
    result = run("prefix", model, tokenizer, steps=2, lr=1e-2, batch_size=2, train_pairs=pairs, eval_pairs=pairs[:2],
                 show_progress=False)
    assert result.trainable_params == sum(p.numel() for p in start.values())
    assert all(not torch.equal(p, start[name]) for name, p in model.named_parameters() if p.requires_grad), (
        "every prefix tensor should have been updated by two AdamW steps")
    assert all(torch.equal(p, frozen[name]) for name, p in base.named_parameters()), "the base model changed"
