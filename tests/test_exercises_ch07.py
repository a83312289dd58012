"""Chapter 07's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the build
exercises (cache update, decode loop) plugged into minillm reproduce HF generate's ids, and leave nothing behind."""

import pytest
import torch

from minillm import cache as kv_cache
from minillm import generation
from minillm import exercises
from minillm.exercises import ch07, use
from exercise_helpers import outputs, run_three, stub


pytestmark = pytest.mark.usefixtures("one_thread")  # as the notebooks run


# --- 7.1 the cache update (build) -------------------------------------------------------------------------


def update_layer(K, V, seen, k, v):
    T, L = k.size(2), K.size(2)
    if seen + T <= L:
        K[:, :, seen:seen + T] = k
        V[:, :, seen:seen + T] = v
        return K[:, :, :seen + T], V[:, :, :seen + T]
    kept = min(seen, L)
    keys, values = torch.cat((K[:, :, :kept], k), dim=2), torch.cat((V[:, :, :kept], v), dim=2)
    K[:] = keys[:, :, keys.size(2) - L:]
    V[:] = values[:, :, values.size(2) - L:]
    return keys, values


def update_layer_keeping_the_oldest(K, V, seen, k, v):  # rolls the wrong end out of the window
    T, L = k.size(2), K.size(2)
    if seen + T <= L:
        return update_layer(K, V, seen, k, v)
    kept = min(seen, L)
    keys, values = torch.cat((K[:, :, :kept], k), dim=2), torch.cat((V[:, :, :kept], v), dim=2)
    K[:], V[:] = keys[:, :, :L], values[:, :, :L]
    return keys, values


def update_layer_copying(K, V, seen, k, v):  # right values, but a fresh tensor where a view of the buffer will do
    keys, values = update_layer(K, V, seen, k, v)
    return keys.clone(), values.clone()


def test_update_layer_check(capsys):
    passed, stubbed, wrong = run_three(ch07.check_update_layer, update_layer, update_layer_keeping_the_oldest, capsys)
    ch07.check_update_layer(update_layer_copying)
    ch07.check_update_layer(lambda K, V, seen, k, v: None)
    copying, nothing = outputs(capsys)
    title = "Exercise 7.1 (KV cache update with a rolling window)"
    assert passed == f"{title}: passed ✓"
    assert stubbed.startswith(f"{title}: not attempted yet")
    assert wrong.startswith(f"{title}: not yet ✗ - case 3: window 4, buffer L=3, step 3 (seen=3, T=1 new): the "
                            "first 3 positions of the buffer K afterwards: first mismatch at index (0, 0, 0, 0)")
    assert copying.startswith(f"{title}: not yet ✗ - case 1: no window, buffer L=8, step 1 (seen=0, T=5 new): the "
                              "new positions fit in the buffer, so the keys returned should be a view of K")
    assert nothing.startswith(f"{title}: not yet ✗ - case 1: no window, buffer L=8, step 1 (seen=0, T=5 new): "
                              "expected a pair (keys, values), got NoneType")


# --- 7.2 the decode loop (build) --------------------------------------------------------------------------


def decode_loop(model, input_ids, max_new_tokens, choose_next, cache=None, eos_token_id=None, position=-1):
    ids, step_input = input_ids, input_ids
    finished = torch.zeros(ids.size(0), dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(ids if cache is None else step_input, cache=cache)[:, position]
        next_id = choose_next(logits)
        if eos_token_id is not None:
            next_id = torch.where(finished, eos_token_id, next_id)
            finished = finished | (next_id == eos_token_id)
        ids = torch.cat((ids, next_id[:, None]), dim=1)
        if eos_token_id is not None and finished.all():
            break
        step_input = next_id[:, None]
    return ids


def decode_loop_first_position(model, input_ids, max_new_tokens, choose_next, cache=None, eos_token_id=None):
    return decode_loop(model, input_ids, max_new_tokens, choose_next, cache, eos_token_id, position=0)


def decode_loop_ignoring_the_cache(model, input_ids, max_new_tokens, choose_next, cache=None, eos_token_id=None):
    return decode_loop(model, input_ids, max_new_tokens, choose_next, None, eos_token_id)


def decode_loop_ignoring_eos(model, input_ids, max_new_tokens, choose_next, cache=None, eos_token_id=None):
    return decode_loop(model, input_ids, max_new_tokens, choose_next, cache, None)


def test_decode_loop_check(capsys):
    passed, stubbed, wrong = run_three(ch07.check_decode_loop, decode_loop, decode_loop_first_position, capsys)
    ch07.check_decode_loop(decode_loop_ignoring_the_cache)
    ch07.check_decode_loop(decode_loop_ignoring_eos)
    no_cache, no_eos = outputs(capsys)
    title = "Exercise 7.2 (the cached decode loop)"
    assert passed == f"{title}: passed ✓"
    assert stubbed.startswith(f"{title}: not attempted yet")
    assert wrong.startswith(f"{title}: not yet ✗ - case 1: GPT2LMHeadModel, B=2, prompt 5, 8 new: first different "
                            "id at row 0, position 5")
    assert no_cache == (f"{title}: not yet ✗ - case 1: GPT2LMHeadModel, B=2, prompt 5, 8 new: forward call 1 did not "
                        "get the loop's cache argument (the cache)")
    assert no_eos.startswith(f"{title}: not yet ✗ - case 2: LlamaForCausalLM, B=2, prompt 4, 10 new, eos ")
    assert no_eos.endswith("eos 43: first different id at row 0, position 5: HF 43, yours 89")


def test_decode_loop_second_hint_level(capsys, monkeypatch):
    monkeypatch.setattr(exercises, "_failures", {})  # earlier tests failed this check too
    ch07.check_decode_loop(decode_loop_first_position)
    assert "more:" not in capsys.readouterr().out
    ch07.check_decode_loop(decode_loop_first_position)
    assert "more: model(x, cache=cache) returns (B, T_x, V)" in capsys.readouterr().out


# --- plugged in: generate with the learner's cache update and decode loop vs HF generate -----------------


CLAIM = ("greedy ids equal HF generate's (GPT-2, Llama GQA, Mistral window 5 < 30 positions; every top-2 logit gap "
         "> 1e-3)")


def test_plugged_in_generation_matches_hf(capsys):
    with use(cache_update=update_layer, decode_loop=decode_loop):
        assert kv_cache.update_layer is update_layer and generation.decode_loop is decode_loop
        assert ch07.end_to_end_generate()
    with use(cache_update=update_layer):
        assert ch07.end_to_end_generate()
    both, cache_only = capsys.readouterr().out.splitlines()
    assert both == f"with your cache update and your decode loop, {CLAIM}: ✓"
    assert cache_only == f"with your cache update, {CLAIM}: ✓"


def test_wrong_components_plugged_in_fail_end_to_end(capsys):
    with use(cache_update=update_layer_keeping_the_oldest):  # only the window rolls: GPT-2 and Llama still agree
        assert not ch07.end_to_end_generate()
    with use(decode_loop=decode_loop_first_position):
        assert not ch07.end_to_end_generate()
    window, loop = capsys.readouterr().out.splitlines()
    assert window.startswith(f"with your cache update, {CLAIM}: ✗ - Mistral: first different id at row ")
    assert loop.startswith(f"with your decode loop, {CLAIM}: ✗ - GPT-2: first different id at row 0, position 6")


def test_stubs_plugged_in_are_skipped(capsys):
    with use(cache_update=stub, decode_loop=decode_loop):
        ch07.end_to_end_generate()
    assert capsys.readouterr().out.startswith("plug-in skipped: your cache_update (exercise 7.1), decode_loop "
                                              "(exercise 7.2) is not written yet")


def _reference_ids():
    """The chapter's reference output: minillm's greedy Mistral ids, which go through both seams."""
    ours = ch07._ours(ch07._hf_model("llama", sliding_window=3))
    return generation.generate(ours, torch.arange(2, 14).view(2, 6), 10)


def test_plug_in_leaves_the_package_unchanged():
    originals = kv_cache.update_layer, generation.decode_loop
    before = _reference_ids()
    with use(cache_update=update_layer_keeping_the_oldest, decode_loop=decode_loop_first_position):
        assert not torch.equal(_reference_ids(), before)
    assert (kv_cache.update_layer, generation.decode_loop) == originals
    with pytest.raises(ZeroDivisionError):
        with use(cache_update=update_layer, decode_loop=decode_loop):
            1 / 0
    assert kv_cache.update_layer is originals[0] and generation.decode_loop is originals[1]
    assert torch.equal(_reference_ids(), before)


# --- 7.3 top-k ------------------------------------------------------------------------------------


def top_k_filter(logits, k):
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_k_filter_one_too_many(logits, k):  # keeps k + 1 tokens: an off-by-one in the threshold
    kth = torch.topk(logits, min(k + 1, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def test_top_k_check(capsys):
    passed, stubbed, wrong = run_three(ch07.check_top_k_filter, top_k_filter, top_k_filter_one_too_many, capsys)
    assert passed == "Exercise 7.3 (top-k filter): passed ✓"
    assert stubbed.startswith("Exercise 7.3 (top-k filter): not attempted yet")
    assert wrong == ("Exercise 7.3 (top-k filter): not yet ✗ - case 1: top_k_filter(logits (1, 10), k=3): row 0 "
                     "keeps 4 tokens, HF keeps 3")


# --- 7.4 top-p ------------------------------------------------------------------------------------


def top_p_filter(logits, p, strict=False):
    sorted_logits, order = torch.sort(logits, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative < 1 - p if strict else cumulative <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def top_p_filter_strict(logits, p):  # `<` instead of `<=`: keeps one token too many exactly at the boundary
    return top_p_filter(logits, p, strict=True)


def top_p_filter_without_the_crossing_token(logits, p):  # stops *before* reaching p: one token too few
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative > p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def top_p_filter_tokens_reversed(logits, p):  # right, but among tied tokens it may keep other positions
    return top_p_filter(logits.flip(-1), p).flip(-1)


def test_top_p_check(capsys):
    passed, stubbed, wrong = run_three(ch07.check_top_p_filter, top_p_filter, top_p_filter_without_the_crossing_token,
                                       capsys)
    ch07.check_top_p_filter(top_p_filter_strict)
    ch07.check_top_p_filter(top_p_filter_tokens_reversed)
    strict, reversed_ = outputs(capsys)
    assert passed == "Exercise 7.4 (top-p filter): passed ✓"
    assert stubbed.startswith("Exercise 7.4 (top-p filter): not attempted yet")
    assert wrong.startswith("Exercise 7.4 (top-p filter): not yet ✗ - case 1: top_p_filter(logits (1, 10), p=0.9): "
                            "row 0 keeps ")
    assert strict == ("Exercise 7.4 (top-p filter): not yet ✗ - case 6: top_p_filter(logits (1, 2), p=0.5): row 0 "
                      "keeps 2 tokens, HF keeps 1")
    assert reversed_ == "Exercise 7.4 (top-p filter): passed ✓"


# --- 7.5 sampling ---------------------------------------------------------------------------------


def sample_next_token(logits, temperature, generator):
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def sample_multiplying_by_temperature(logits, temperature, generator):  # T * logits: the inverse effect
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits * temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def test_sample_next_token_check(capsys):
    passed, stubbed, wrong = run_three(ch07.check_sample_next_token, sample_next_token,
                                       sample_multiplying_by_temperature, capsys)
    ch07.check_sample_next_token(lambda logits, t, g: logits.argmax(-1, keepdim=True))
    ch07.check_sample_next_token(lambda logits, t, g: None)
    bad_shape, nothing = outputs(capsys)
    assert passed == "Exercise 7.5 (sample with temperature): passed ✓"
    assert stubbed.startswith("Exercise 7.5 (sample with temperature): not attempted yet")
    assert wrong.startswith("Exercise 7.5 (sample with temperature): not yet ✗ - case 3: ids sampled at "
                            "temperature 0.5 (seed 3): first mismatch at index")
    assert bad_shape == ("Exercise 7.5 (sample with temperature): not yet ✗ - case 1: expected token ids of "
                         "shape (3,), got (3, 1)")
    assert nothing == ("Exercise 7.5 (sample with temperature): not yet ✗ - case 1: expected token ids of "
                       "shape (3,), got NoneType")
