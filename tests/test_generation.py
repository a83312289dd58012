"""minillm.generation against HF Transformers' `generate` and logits processors, on the same weights.

References run here: HF eager models built from configs (tests/models/hf_reference.py, init std 0.2 so that
tiny random models do not repeat one token) and `TopKLogitsWarper` / `TopPLogitsWarper` from
transformers.generation.logits_process.
"""

import sys
from pathlib import Path

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

sys.path.insert(0, str(Path(__file__).parent / "models"))
from hf_reference import gpt2, llama  # noqa: E402

from minillm.generation import generate, sample_next_token, top_k_filter, top_p_filter  # noqa: E402
from minillm.models import GPT, Llama  # noqa: E402

V, PROMPT, NEW = 97, 6, 24
MODELS = {  # name -> (HF builder, keywords, our class); mistral's window (5) is shorter than the 30 tokens
    "gpt2": (gpt2, dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64), GPT),
    "llama-gqa": (llama, dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), Llama),
    "mistral-w5": (llama, dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               sliding_window=5), Llama),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    build, sizes, cls = MODELS[request.param]
    hf = build(**sizes)
    return hf, cls.from_hf(hf).eval()


def prompts(B=2, T=PROMPT, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_generate(hf, ids, **kwargs):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, **kwargs)


def test_greedy_ids_equal_hf_generate(pair):
    hf, ours = pair
    ids = prompts()
    expected = hf_generate(hf, ids, do_sample=False, min_new_tokens=NEW)
    got = generate(ours, ids, NEW)
    assert len(set(got[:, PROMPT:].flatten().tolist())) >= 5, "the test model should not repeat one token"
    assert torch.equal(got, expected), (
        f"greedy ids differ from HF generate(do_sample=False):\n ours {got[:, PROMPT:].tolist()}\n "
        f"HF   {expected[:, PROMPT:].tolist()}")


def test_the_window_matters_for_mistral():
    build, sizes, _ = MODELS["mistral-w5"]
    windowed = Llama.from_hf(build(**sizes))
    full = Llama.from_hf(build(**{k: v for k, v in sizes.items() if k != "sliding_window"}))
    assert not torch.equal(generate(windowed, prompts(), NEW), generate(full, prompts(), NEW)), (
        "with a window of 5 over 30 tokens the output should differ from full attention, or the test is weak")


def test_sampling_equals_hf_generate_with_the_same_seed(pair):
    hf, ours = pair
    ids = prompts(B=3, seed=1)
    settings = dict(temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    expected = hf_generate(hf, ids, do_sample=True, min_new_tokens=NEW, **settings)
    torch.manual_seed(123)  # HF draws with torch.multinomial from the global generator: so do we, generator=None
    got = generate(ours, ids, NEW, **settings)
    assert torch.equal(got, expected), "sampled ids differ from HF: apply temperature, then top-k, then top-p"


@pytest.mark.parametrize("sampling", [{}, dict(temperature=1.3, top_k=10)])
def test_cached_generation_equals_uncached(pair, sampling):
    _, ours = pair
    ids = prompts(B=2, seed=2)
    cached = generate(ours, ids, NEW, generator=torch.Generator().manual_seed(5), **sampling)
    uncached = generate(ours, ids, NEW, use_cache=False, generator=torch.Generator().manual_seed(5), **sampling)
    assert torch.equal(cached, uncached), "use_cache must only change the speed, never the tokens"


def test_seeded_generator_makes_sampling_reproducible(pair):
    _, ours = pair
    ids = prompts(B=2, seed=3)
    runs = [generate(ours, ids, NEW, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]), "the same seed must give the same sample"
    assert not torch.equal(runs[0], runs[2]), "another seed should give another sample"


def test_eos_stops_and_finished_rows_repeat_eos_as_in_hf(pair):
    hf, ours = pair
    ids = prompts(B=2, seed=4)
    greedy = generate(ours, ids, NEW)
    eos = int(greedy[0, PROMPT + 3])  # row 0 reaches it at step 3 at the latest
    expected = hf_generate(hf, ids, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    got = generate(ours, ids, NEW, eos_token_id=eos)
    assert torch.equal(got, expected), "with eos, ids must equal HF's (pad_token_id = eos)"
    first = (got[0, PROMPT:] == eos).nonzero()[0, 0]
    assert (got[0, PROMPT + first:] == eos).all(), "a finished row must keep emitting eos"


@pytest.mark.parametrize("k", [1, 3, 10, 96, 97, 200])
def test_top_k_filter_equals_hf_warper(k):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(k))
    logits[1, :5] = logits[1, 0]  # ties
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), expected), "keep the k largest (ties kept), -inf elsewhere"


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_top_p_filter_equals_hf_warper(p, scale):
    logits = scale * torch.randn(5, 3, V, generator=torch.Generator().manual_seed(int(p * 1000)))
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone().view(-1, V)).view(5, 3, V)
    assert torch.equal(top_p_filter(logits, p), expected), (
        "keep the smallest set of most likely tokens with total probability >= p, and always the top one")


def test_greedy_sample_is_argmax_and_temperature_zero_ignores_filters():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, 0.0, top_k=3, top_p=0.5), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(0)),
                       logits.argmax(-1)), "top_k=1 sampling must pick the argmax"


def test_generate_restores_the_training_mode(pair):
    _, ours = pair
    ours.train()
    generate(ours, prompts(), 2)
    assert ours.training, "generate must put the model back in the mode it found it in"
    ours.eval()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_new_tokens=59), ValueError, "exceed the model's context length max_seq_len=64"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
    (dict(temperature=-1.0), ValueError, "temperature must be a number >= 0"),
    (dict(temperature=1.0, top_k=0), ValueError, "top_k must be None or an int >= 1"),
    (dict(temperature=1.0, top_p=1.5), ValueError, r"top_p must be None or a probability in \(0, 1\]"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(eos_token_id=V), ValueError, r"eos_token_id must be None or a token id in \[0, 97\)"),
])
def test_bad_generate_arguments_name_the_problem(pair, kwargs, error, message):
    _, ours = pair
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        generate(ours, prompts(), kwargs.pop("max_new_tokens"), **kwargs)


def test_bad_inputs_to_generate_and_filters():
    ours = GPT.from_hf(gpt2(**MODELS["gpt2"][1]))
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, T\) tensor"):
        generate(ours, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(TypeError, match="model must be a minillm causal LM"):
        generate(torch.nn.Linear(2, 2), prompts(), 2)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        top_k_filter(torch.zeros(2, 5), 0)
    with pytest.raises(ValueError, match=r"p must be a probability in \(0, 1\]"):
        top_p_filter(torch.zeros(2, 5), 0.0)
