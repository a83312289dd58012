"""minillm.peft.prompt.PromptTuning against PEFT 0.21's PromptTuningConfig model, with the same weights.

References run here: `peft.get_peft_model(hf_twin, PromptTuningConfig(...))` on HF eager GPT-2 and Llama
(tests/models/hf_reference.py) and our model converted from the same HF weights, the soft prompt copied from
PEFT's `prompt_encoder`. PEFT returns logits for the P virtual positions too, (B, P + T, V); ours are its
last T rows and must equal them bit for bit, as must the soft prompt's gradient and greedy generation.
The three initialisations are compared with PEFT's under the same seed (TEXT through a local HF tokenizer
made from the shipped tokenizer.json, which is in HF's format).

PEFT's own `generate()` re-prepends the soft prompt at every decoding step on this stack; generation is
therefore compared with a manual cached loop over HF's base model, and one test documents the bug.
"""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from hf_reference import gpt2, llama, token_batch  # noqa: E402

from minillm.generation import generate  # noqa: E402
from minillm.models import GPT, Llama  # noqa: E402
from minillm.peft.prompt import PromptTuning, input_embedding  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU-feature probe logs when peft imports it
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # inside PEFT
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]  # PEFT's generate

P = 4  # virtual tokens
ARCHS = {
    "gpt2": lambda: gpt2(vocab_size=37, n_positions=24, n_embd=12, n_layer=2, n_head=3),
    "llama-gqa": lambda: llama(vocab_size=41, max_position_embeddings=24, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}


def twins(arch: str):
    """(PEFT prompt-tuning model on the HF twin, our PromptTuning on the same weights with PEFT's prompt)."""
    hf = ARCHS[arch]()
    model = PromptTuning((GPT if arch == "gpt2" else Llama).from_hf(hf), P)
    reference = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        model.embedding.weight.copy_(reference.prompt_encoder.default.embedding.weight)
    return reference, model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_gradient_equal_peft_bit_for_bit(arch):
    reference, model = twins(arch)
    ids, _ = token_batch(37, B=3, T=9)
    expected, got = reference(ids).logits, model(ids)
    assert expected.shape[1] == P + 9, "PEFT's logits include the virtual positions"
    assert got.shape == (3, 9, expected.size(-1)), f"logits shape {tuple(got.shape)}: only the real tokens have rows"
    assert torch.equal(got, expected[:, P:]), (
        f"logits differ from PEFT's real rows by {(got - expected[:, P:]).abs().max():.3g}: the soft prompt goes "
        "in front of the token embeddings, before the position embeddings are added")
    (expected[:, P:].square().mean() + expected[:, -1].sum()).backward()
    (got.square().mean() + got[:, -1].sum()).backward()
    expected_grad = reference.prompt_encoder.default.embedding.weight.grad
    assert torch.equal(model.embedding.weight.grad, expected_grad), (
        f"soft prompt gradient differs from PEFT's by {(model.embedding.weight.grad - expected_grad).abs().max():.3g}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_padded_batch_equals_peft_on_real_tokens(arch):
    reference, model = twins(arch)
    ids, attention_mask = token_batch(37, B=3, T=10, seed=1)  # row 1 left-padded, row 2 right-padded
    with torch.no_grad():
        expected = reference(ids, attention_mask=attention_mask).logits[:, P:]
        got = model(ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    assert torch.equal(got[real], expected[real]), (
        f"with padding, logits differ from PEFT's by {(got - expected)[real].abs().max():.3g}: prepend P ones to "
        "the attention mask")


@pytest.mark.parametrize("init", list(PEFT_INIT))
def test_random_and_vocab_init_equal_peft_with_the_same_seed(init):
    ours_base, hf_base = GPT.from_hf(ARCHS["gpt2"]()), ARCHS["gpt2"]()  # the builders seed torch
    torch.manual_seed(5)
    model = PromptTuning(ours_base, P, init=init)
    torch.manual_seed(5)
    reference = peft.get_peft_model(hf_base, peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init=PEFT_INIT[init]))
    expected = reference.prompt_encoder.default.embedding.weight
    assert torch.equal(model.embedding.weight, expected), (
        f"init={init!r}: with the same seed the soft prompt should be PEFT's "
        "(random: nn.Embedding's N(0, 1); vocab: embedding rows of torch.randint(0, V, (P,)) drawn after it)")
    assert model.embedding.weight.dtype == torch.float32 and model.embedding.weight.requires_grad


@pytest.mark.parametrize("num_virtual_tokens", [5, 23], ids=["cut", "cycled"])
def test_text_init_equals_peft_through_the_shipped_tokenizer(tmp_path, num_virtual_tokens):
    transformers = pytest.importorskip("transformers")
    from minillm.pretrained import PRETRAINED_DIR, load_pretrained
    base, tokenizer = load_pretrained()
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(PRETRAINED_DIR / "tokenizer.json"))
    hf_tokenizer.save_pretrained(tmp_path)  # PEFT's TEXT init loads a tokenizer by path
    text = "Answer the question about the story."
    reference = peft.get_peft_model(base.to_hf(), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path)))
    model = PromptTuning(base, num_virtual_tokens, init="text", init_text=text, tokenizer=tokenizer)
    assert torch.equal(model.embedding.weight, reference.prompt_encoder.default.embedding.weight), (
        f"init='text' with {len(tokenizer.encode(text))} text tokens and P={num_virtual_tokens}: rows are the "
        "embeddings of the text's ids, cut to P or repeated until P")


def test_only_the_soft_prompt_trains_and_the_model_is_left_unhooked():
    _, model = twins("gpt2")
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["embedding.weight"]
    ids = token_batch(37, B=2, T=4)[0]
    model(ids).sum().backward()
    assert all(p.grad is None for p in model.model.parameters()), "a base-model parameter received a gradient"
    assert not input_embedding(model.model)._forward_hooks, "the embedding hook must be removed after each call"
    with torch.no_grad():
        assert torch.equal(model.model(ids), GPT.from_hf(ARCHS["gpt2"]())(ids)), "the base model must be unchanged"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_equals_manual_cached_loop_over_hf(arch):
    reference, model = twins(arch)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    n = 8
    base = reference.base_model
    with torch.no_grad():  # the reference: the soft prompt read once, then single cached steps
        embeds = torch.cat((reference.get_prompt(2), base.get_input_embeddings()(ids)), dim=1)  # (B, P + T, C)
        out = base(inputs_embeds=embeds, use_cache=True)
        cache, logits, expected = out.cache, out.logits, ids
        for _ in range(n):
            next_id = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            expected = torch.cat((expected, next_id), dim=1)
            logits = base(next_id, cache=cache).logits
    got = generate(model, ids, n)
    assert torch.equal(got, expected), f"greedy tokens {got.tolist()}, HF with the soft prompt {expected.tolist()}"
    assert torch.equal(generate(model, ids, n, use_cache=False), got), (
        "generation without the KV cache (full recompute) must give the same tokens as with it")


def test_reference_bug_peft_generate_prepends_the_prompt_at_every_step():
    """Documents REFERENCE behaviour (PEFT 0.21.2 + transformers 5.24), not minillm's: `PeftModel.generate`
    gets the first new token right, then feeds the P virtual embeddings again with every decoding step, so
    the text drifts from the correct greedy continuation (the cache grows by P + 1 positions per step: a
    GPT-2 runs off its position table). Chapter 10 shows this; if this test fails, PEFT fixed the bug: update
    the chapter's section on it and this test."""
    reference, model = twins("llama-gqa")
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    correct = generate(model, ids, 8)
    with torch.no_grad():
        peft_tokens = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(peft_tokens[:, :4], correct[:, :4]), "PEFT's first new token is expected to be right"
    assert not torch.equal(peft_tokens, correct), "PEFT's generate now agrees with the correct continuation"


def test_prompt_uses_up_context():
    _, model = twins("gpt2")  # n_positions 24, P 4: 20 real positions are left
    assert model.config.max_seq_len == 20
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, torch.zeros(1, 15, dtype=torch.long), 6)
    assert model(torch.zeros(1, 20, dtype=torch.long)).shape == (1, 20, 37)


class _Tokenizer:
    def __init__(self, ids):
        self.ids = ids

    def encode(self, text):
        return self.ids


def test_bad_arguments_raise_clear_errors():
    base = GPT.from_hf(ARCHS["gpt2"]())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_virtual_tokens must be an int >= 1"):
            PromptTuning(base, bad)
    with pytest.raises(ValueError, match="leaves no room for text"):
        PromptTuning(base, 30)
    with pytest.raises(ValueError, match="init must be one of 'random', 'vocab', 'text'"):
        PromptTuning(base, 2, init="TEXT")
    with pytest.raises(ValueError, match="init='text' needs tokenizer="):
        PromptTuning(base, 2, init="text", init_text="hello")
    with pytest.raises(ValueError, match="needs a non-empty init_text"):
        PromptTuning(base, 2, init="text", tokenizer=_Tokenizer([1, 2]))
    with pytest.raises(ValueError, match="only used with init='text'"):
        PromptTuning(base, 2, init_text="hello")
    with pytest.raises(ValueError, match=r"inside the model's vocabulary \[0, 37\)"):
        PromptTuning(base, 2, init="text", init_text="hello", tokenizer=_Tokenizer([3, 500]))
    with pytest.raises(TypeError, match="minillm causal LM"):
        PromptTuning(torch.nn.Linear(2, 2), 2)


def test_trains_under_finetune_run_and_only_the_soft_prompt_changes():
    from minillm.finetune import run, task_pairs
    from minillm.pretrained import load_pretrained
    base, tokenizer = load_pretrained()
    frozen = {name: p.clone() for name, p in base.named_parameters()}
    model = PromptTuning(base, 3, init="vocab")
    start = model.embedding.weight.clone()
    pairs = task_pairs("train")[:4]
    result = run("prompt", model, tokenizer, steps=2, lr=1e-2, batch_size=2, train_pairs=pairs, eval_pairs=pairs[:2],
                 show_progress=False)
    assert result.trainable_params == start.numel() == 3 * base.config.hidden_size
    assert not torch.equal(model.embedding.weight, start), "the soft prompt should have been updated"
    assert all(torch.equal(p, frozen[name]) for name, p in base.named_parameters()), "the base model changed"
