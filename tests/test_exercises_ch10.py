"""Chapter 10's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import logging

import pytest
import torch
import torch.nn.functional as F

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
pytest.importorskip("peft")
from minillm.exercises import ch10  # noqa: E402
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


# --- 10.2 attention over a prefix ------------------------------------------------------------------


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
    assert passed == "Exercise 10.2 (attention over a prefix): passed ✓"
    assert stubbed.startswith("Exercise 10.2 (attention over a prefix): not attempted yet")
    assert wrong.startswith("Exercise 10.2 (attention over a prefix): not yet ✗ - case 1: "
                            "attention_with_prefix(B=1, nh=1, P=1, T=1, hd=4): first mismatch")


# --- 10.3 parameter count -----------------------------------------------------------------------------


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
    assert passed == "Exercise 10.3 (count prefix-tuning parameters): passed ✓"
    assert stubbed.startswith("Exercise 10.3 (count prefix-tuning parameters): not attempted yet")
    assert wrong.startswith("Exercise 10.3 (count prefix-tuning parameters): not yet ✗ - case 2: "
                            "prefix_num_params(L=3, nh=4, nkv=2, hd=8, P=10, encoder_hidden_size=None): expected 960")


# --- 10.4 cached greedy decoding -------------------------------------------------------------------------


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
    assert line.startswith("Exercise 10.4 (cached greedy decoding with virtual tokens): not yet ✗ - case 1: "
                           "greedy_generate(prefix tuning on gpt2, B=1, T=3, n=6): right ids, but the first call got "
                           "no cache")


def test_greedy_generate_check(capsys):
    passed, stubbed, wrong = run_three(ch10.check_greedy_generate, greedy_generate,
                                       greedy_generate_without_cache_in_steps, capsys)
    assert passed == "Exercise 10.4 (cached greedy decoding with virtual tokens): passed ✓"
    assert stubbed.startswith("Exercise 10.4 (cached greedy decoding with virtual tokens): not attempted yet")
    assert wrong.startswith("Exercise 10.4 (cached greedy decoding with virtual tokens): not yet ✗ - case 1: "
                            "greedy_generate(prefix tuning on gpt2, B=1, T=3, n=6): first mismatch")
