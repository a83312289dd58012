"""Chapter 10's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import logging

import pytest
import torch
import torch.nn.functional as F

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
pytest.importorskip("peft")
from minillm.exercises import ch10, use  # noqa: E402
from minillm.peft.prefix import PrefixTuning  # noqa: E402
from minillm.peft.prompt import PromptTuning  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),  # deprecations inside PEFT / transformers
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]


# --- 10.1 prefix layout --------------------------------------------------------------------------


def prefix_layers(table, num_layers, num_kv_heads, head_dim):
    B, P, _ = table.shape
    kv = table.view(B, P, 2 * num_layers, num_kv_heads, head_dim).permute(2, 0, 3, 1, 4)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(num_layers)]


def prefix_layers_keys_first(table, num_layers, num_kv_heads, head_dim):  # [key, value][layer] instead
    B, P, _ = table.shape
    kv = table.view(B, P, 2, num_layers, num_kv_heads, head_dim).permute(2, 3, 0, 4, 1, 5)
    return [(kv[0, i], kv[1, i]) for i in range(num_layers)]


def test_prefix_layers_check(capsys):
    passed, stubbed, wrong = run_three(ch10.check_prefix_layers, prefix_layers, prefix_layers_keys_first, capsys)
    assert passed == "Exercise 10.1 (cut the prefix table into layers): passed ✓"
    assert stubbed.startswith("Exercise 10.1 (cut the prefix table into layers): not attempted yet")
    assert wrong.startswith("Exercise 10.1 (cut the prefix table into layers): not yet ✗ - case 2: "
                            "prefix_layers(L=2, nkv=2, hd=4, P=5, B=2), layer 0 values: first mismatch")


# --- 10.2 prefix injection through the KV cache (build) ------------------------------------------------------

ORIGINAL_FORWARD = PrefixTuning.__dict__["forward"]
ORIGINAL_PREPEND = PromptTuning.__dict__["prepend_soft_prompt"]


def prefix_forward(self, input_ids, attention_mask=None, cache=None):
    B, T = self.check_text(input_ids, cache)
    P = self.num_virtual_tokens
    if cache is None:
        cache = self.model.make_cache(B, max_len=P + T)
    if cache.length == 0:  # a new text: the prefix is what the cache would hold after P tokens
        for layer, (keys, values) in enumerate(self.prefix_key_values(B)):  # (B, nkv, P, hd) each
            cache.update(layer, keys, values)
    if attention_mask is not None:
        attention_mask = torch.cat((attention_mask.new_ones(B, P), attention_mask), dim=1)  # (B, P + T)
    return self.model(input_ids, attention_mask=attention_mask, cache=cache)


def prefix_forward_keys_and_values_swapped(self, input_ids, attention_mask=None, cache=None):
    B, T = self.check_text(input_ids, cache)
    if cache is None:
        cache = self.model.make_cache(B, max_len=self.num_virtual_tokens + T)
    if cache.length == 0:
        for layer, (keys, values) in enumerate(self.prefix_key_values(B)):
            cache.update(layer, values, keys)
    return self.model(input_ids, attention_mask=self.with_virtual_mask(attention_mask, B), cache=cache)


def prefix_forward_mask_not_extended(self, input_ids, attention_mask=None, cache=None):
    B, T = self.check_text(input_ids, cache)
    if cache is None:
        cache = self.model.make_cache(B, max_len=self.num_virtual_tokens + T)
    if cache.length == 0:
        for layer, (keys, values) in enumerate(self.prefix_key_values(B)):
            cache.update(layer, keys, values)
    return self.model(input_ids, attention_mask=attention_mask, cache=cache)


def prefix_forward_every_call(self, input_ids, attention_mask=None, cache=None):  # writes the prefix again
    B, T = self.check_text(input_ids, cache)
    if cache is None:
        cache = self.model.make_cache(B, max_len=self.num_virtual_tokens + T)
    for layer, (keys, values) in enumerate(self.prefix_key_values(B)):
        cache.update(layer, keys, values)
    return self.model(input_ids, attention_mask=self.with_virtual_mask(attention_mask, B), cache=cache)


def test_prefix_forward_check(capsys):
    passed, stubbed, wrong = run_three(ch10.check_prefix_forward, prefix_forward,
                                       prefix_forward_keys_and_values_swapped, capsys)
    assert passed == "Exercise 10.2 (prefix injection through the KV cache): passed ✓"
    assert stubbed.startswith("Exercise 10.2 (prefix injection through the KV cache): not attempted yet")
    assert wrong.startswith("Exercise 10.2 (prefix injection through the KV cache): not yet ✗ - case 1: "
                            "forward(prefix tuning on gpt2, P=3, B=1, T=4), logits of the real tokens: first mismatch")


def test_prefix_forward_check_wants_the_mask_extended_and_the_prefix_written_once(capsys):
    ch10.check_prefix_forward(prefix_forward_mask_not_extended)
    ch10.check_prefix_forward(prefix_forward_every_call)
    mask, every_call = outputs(capsys)
    assert mask.startswith("Exercise 10.2 (prefix injection through the KV cache): not yet ✗ - case 3: "
                           "your code raised ValueError: Llama: attention_mask must be")
    assert every_call.startswith("Exercise 10.2 (prefix injection through the KV cache): not yet ✗ - case 5: "
                                 "your code raised ValueError: KVCache: the context length would be exceeded")


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_plugged_in_prefix_forward_matches_peft(capsys):
    with use(prefix_forward=prefix_forward):
        assert ch10.end_to_end_prefix()
    assert last_line(capsys).endswith("equals the manual cached HF loop: ✓")


def test_plugged_in_wrong_prefix_forward_fails(capsys):
    with use(prefix_forward=prefix_forward_keys_and_values_swapped):
        assert not ch10.end_to_end_prefix()
    assert "HF loop: ✗ - the shipped GPT: logits of the real tokens differ from PEFT's by up to" in last_line(capsys)


def reference_logits(kind):
    model, _ = ch10._virtual_twins(kind, "llama", 3)
    ids, mask = ch10._padded_batch(31, 2, 6, seed=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def test_prefix_plug_in_restores_the_package(capsys):
    before = reference_logits("prefix")
    with use(prefix_forward=stub):
        ch10.end_to_end_prefix()
    assert "plug-in skipped" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        with use(prefix_forward=prefix_forward_keys_and_values_swapped):
            assert not torch.equal(reference_logits("prefix"), before)  # the swap is live inside the block
            raise RuntimeError("a cell failed")
    assert PrefixTuning.__dict__["forward"] is ORIGINAL_FORWARD
    assert torch.equal(reference_logits("prefix"), before)


# --- 10.3 the soft prompt (build) --------------------------------------------------------------------------


def prepend_soft_prompt(self, token_embeddings):
    B = token_embeddings.size(0)
    prompt = self.embedding.weight.expand(B, -1, -1).to(token_embeddings.dtype)  # (B, P, C): one prompt, shared
    return torch.cat((prompt, token_embeddings), dim=1)  # (B, P + T, C)


def append_soft_prompt(self, token_embeddings):  # the prompt after the text
    prompt = self.embedding.weight.expand(token_embeddings.size(0), -1, -1).to(token_embeddings.dtype)
    return torch.cat((token_embeddings, prompt), dim=1)


def prepend_soft_prompt_cast_first(self, token_embeddings):  # the batch's gradients summed in bfloat16
    prompt = self.embedding.weight.to(token_embeddings.dtype).expand(token_embeddings.size(0), -1, -1)
    return torch.cat((prompt, token_embeddings), dim=1)


def test_prepend_soft_prompt_check(capsys):
    passed, stubbed, wrong = run_three(ch10.check_prepend_soft_prompt, prepend_soft_prompt, append_soft_prompt,
                                       capsys)
    assert passed == "Exercise 10.3 (the soft prompt in front of the text): passed ✓"
    assert stubbed.startswith("Exercise 10.3 (the soft prompt in front of the text): not attempted yet")
    assert wrong.startswith("Exercise 10.3 (the soft prompt in front of the text): not yet ✗ - case 1: "
                            "prepend_soft_prompt(P=3, B=1, T=4, float32): first mismatch")


def test_prepend_soft_prompt_check_catches_a_bfloat16_sum(capsys):
    ch10.check_prepend_soft_prompt(prepend_soft_prompt_cast_first)
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 10.3 (the soft prompt in front of the text): not yet ✗ - case 4: "
                           "prepend_soft_prompt(P=3, B=2, T=3, bfloat16), gradient of embedding.weight: first mismatch")


def test_plugged_in_soft_prompt_matches_peft(capsys):
    with use(soft_prompt=prepend_soft_prompt):
        assert ch10.end_to_end_prompt()
    assert last_line(capsys).endswith("equals the manual cached HF loop: ✓")


def test_plugged_in_wrong_soft_prompt_fails(capsys):
    with use(soft_prompt=append_soft_prompt):
        assert not ch10.end_to_end_prompt()
    assert "HF loop: ✗ - the shipped GPT: logits of the real tokens differ from PEFT's by up to" in last_line(capsys)


def test_prompt_plug_in_restores_the_package(capsys):
    before = reference_logits("prompt")
    with use(soft_prompt=stub):
        ch10.end_to_end_prompt()
    assert "plug-in skipped" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        with use(soft_prompt=append_soft_prompt):
            assert not torch.equal(reference_logits("prompt"), before)
            raise RuntimeError("a cell failed")
    assert PromptTuning.__dict__["prepend_soft_prompt"] is ORIGINAL_PREPEND
    assert torch.equal(reference_logits("prompt"), before)


# --- 10.4 attention over a prefix ------------------------------------------------------------------


def attention_with_prefix(q, k, v, prefix_k, prefix_v):
    P, T = prefix_k.size(2), q.size(2)
    keys, values = torch.cat((prefix_k, k), dim=2), torch.cat((prefix_v, v), dim=2)
    scores = q @ keys.transpose(-2, -1) / q.size(-1) ** 0.5  # (B, nh, T, P + T)
    visible = torch.cat((torch.ones(T, P, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()), dim=1)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values


def attention_with_prefix_top_left(q, k, v, prefix_k, prefix_v):  # is_causal over all P + T keys: wrong corner
    return F.scaled_dot_product_attention(q, torch.cat((prefix_k, k), 2), torch.cat((prefix_v, v), 2), is_causal=True)


def test_attention_with_prefix_check(capsys):
    passed, stubbed, wrong = run_three(ch10.check_attention_with_prefix, attention_with_prefix,
                                       attention_with_prefix_top_left, capsys)
    assert passed == "Exercise 10.4 (attention over a prefix): passed ✓"
    assert stubbed.startswith("Exercise 10.4 (attention over a prefix): not attempted yet")
    assert wrong.startswith("Exercise 10.4 (attention over a prefix): not yet ✗ - case 1: "
                            "attention_with_prefix(B=1, nh=1, P=1, T=1, hd=4): first mismatch")


# --- 10.5 parameter count -----------------------------------------------------------------------------


def prefix_num_params(num_layers, num_heads, num_kv_heads, head_dim, num_virtual_tokens, encoder_hidden_size=None):
    kv, P = num_kv_heads * head_dim, num_virtual_tokens
    if encoder_hidden_size is None:
        return P * 2 * num_layers * kv
    E = encoder_hidden_size
    return P * kv + (kv * E + E) + (E * 2 * num_layers * kv + 2 * num_layers * kv)


def prefix_num_params_all_heads(num_layers, num_heads, num_kv_heads, head_dim, num_virtual_tokens,
                                encoder_hidden_size=None):  # sized by the query heads, as if there were no GQA
    return prefix_num_params(num_layers, num_heads, num_heads, head_dim, num_virtual_tokens, encoder_hidden_size)


def test_prefix_num_params_check(capsys):
    passed, stubbed, wrong = run_three(ch10.check_prefix_num_params, prefix_num_params, prefix_num_params_all_heads,
                                       capsys)
    assert passed == "Exercise 10.5 (count prefix-tuning parameters): passed ✓"
    assert stubbed.startswith("Exercise 10.5 (count prefix-tuning parameters): not attempted yet")
    assert wrong.startswith("Exercise 10.5 (count prefix-tuning parameters): not yet ✗ - case 2: "
                            "prefix_num_params(L=3, nh=4, nkv=2, hd=8, P=10, encoder_hidden_size=None): expected 960")


# --- 10.6 cached greedy decoding -------------------------------------------------------------------------


def greedy_generate(model, input_ids, max_new_tokens):
    cache = model.make_cache(input_ids.size(0), input_ids.size(1) + max_new_tokens)
    logits, ids = model(input_ids, cache=cache), input_ids
    for _ in range(max_new_tokens):
        next_id = logits[:, -1].argmax(-1)
        ids = torch.cat((ids, next_id[:, None]), dim=1)
        logits = model(next_id[:, None], cache=cache)
    return ids


def greedy_generate_without_cache_in_steps(model, input_ids, max_new_tokens):  # each step starts a new text
    logits, ids = model(input_ids), input_ids
    for _ in range(max_new_tokens):
        next_id = logits[:, -1].argmax(-1)
        ids = torch.cat((ids, next_id[:, None]), dim=1)
        logits = model(next_id[:, None])
    return ids


def greedy_generate_without_any_cache(model, input_ids, max_new_tokens):  # the whole text again every step
    ids = input_ids
    for _ in range(max_new_tokens):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(-1)[:, None]), dim=1)
    return ids


def test_greedy_generate_check_wants_one_cache(capsys):
    ch10.check_greedy_generate(greedy_generate_without_any_cache)  # right ids: only the call pattern is wrong
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 10.6 (cached greedy decoding with virtual tokens): not yet ✗ - case 1: "
                           "greedy_generate(prefix tuning on gpt2, B=1, T=3, n=6): right ids, but the first call got "
                           "no cache")


def test_greedy_generate_check(capsys):
    passed, stubbed, wrong = run_three(ch10.check_greedy_generate, greedy_generate,
                                       greedy_generate_without_cache_in_steps, capsys)
    assert passed == "Exercise 10.6 (cached greedy decoding with virtual tokens): passed ✓"
    assert stubbed.startswith("Exercise 10.6 (cached greedy decoding with virtual tokens): not attempted yet")
    assert wrong.startswith("Exercise 10.6 (cached greedy decoding with virtual tokens): not yet ✗ - case 1: "
                            "greedy_generate(prefix tuning on gpt2, B=1, T=3, n=6): first mismatch")
