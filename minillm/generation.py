"""Text generation: greedy decoding and sampling (temperature, top-k, top-p), with or without a KV cache.

Chapter 07 teaches this. `generate` matches HF Transformers' `model.generate`: with temperature 0 it picks
the most likely token at each step and returns the same ids as `generate(do_sample=False)` on the same
weights; `top_k_filter` and `top_p_filter` equal HF's `TopKLogitsWarper` and `TopPLogitsWarper`, applied in
HF's order (temperature, then top-k, then top-p).

    ids = generate(model, prompt_ids, max_new_tokens=50)                                   # greedy
    ids = generate(model, prompt_ids, 50, temperature=0.8, top_p=0.9,
                   generator=torch.Generator().manual_seed(0))                              # sampled, reproducible

Shapes: B batch, T positions, V vocabulary.
"""

import math
from collections.abc import Callable
from functools import partial

import torch

from minillm.cache import KVCache


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (..., V) and set the rest to -inf, so softmax gives them 0.

    Ties with the k-th largest are kept too, as in HF's `TopKLogitsWarper`. k >= V keeps everything.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k_filter: k must be an int >= 1 (how many tokens to keep), got {k!r}")
    k = min(k, logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al., 2019): keep the fewest most-likely tokens whose probabilities sum
    to at least p, set the rest of each row (..., V) to -inf. The most likely token always survives.

    Walks the tokens from least to most likely and drops them while the mass dropped so far stays <= 1 - p,
    which is how HF's `TopPLogitsWarper` decides (and rounds); p = 1 keeps everything.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"top_p_filter: p must be a probability in (0, 1], got {p!r}")
    if p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # (..., V), ascending: least likely first
    dropped_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V): mass up to and including each
    drop_sorted = dropped_mass <= 1.0 - p
    drop_sorted[..., -1] = False  # never drop the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back from sorted order to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token id per row of next-token logits (B, V): argmax when temperature is 0, else a sample.

    Sampling divides the logits by the temperature (< 1 sharpens the distribution, > 1 flattens it), then
    filters (top-k, then top-p) and draws from the softmax with `generator`, so a seeded generator gives the
    same text every time.
    """
    _check_sample_args(logits, temperature)
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]  # (B,)


@torch.no_grad()
def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, eos_token_id: int | None = None) -> torch.Tensor:
    """Continue each prompt of `input_ids` (B, T) by up to `max_new_tokens` tokens; returns (B, T + n).

    Greedy when `temperature` is 0 (top_k and top_p are then ignored), otherwise sampling with `generator`.
    The prompts of a batch must have the same length (no padding). With `use_cache` the prompt is run once
    (prefill) and every further step feeds one token and reuses the stored keys and values; without it every
    step reruns the whole text — same tokens, O(T²) instead of O(T) work.

    With `eos_token_id`, a row that has produced it is finished: it keeps emitting `eos_token_id` (as HF does
    when pad_token_id is eos), and generation stops early once every row has finished, so n may be less than
    `max_new_tokens`. The model runs in eval mode (no dropout) and is put back in its previous mode after.
    """
    _check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                         eos_token_id)
    B, T = input_ids.shape
    if T + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"generate: the prompt ({T} tokens) plus max_new_tokens={max_new_tokens} exceed the "
                         f"model's context length max_seq_len={model.config.max_seq_len}; shorten one of them")
    was_training = model.training
    model.eval()
    try:
        cache = model.make_cache(B, max_len=T + max_new_tokens) if use_cache else None
        choose_next = partial(sample_next_token, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
        return decode_loop(model, input_ids, max_new_tokens, choose_next, cache, eos_token_id)
    finally:
        model.train(was_training)


def decode_loop(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                choose_next: Callable[[torch.Tensor], torch.Tensor], cache: KVCache | None = None,
                eos_token_id: int | None = None) -> torch.Tensor:
    """The loop inside `generate`: one forward pass per new token; returns input_ids (B, T) continued, (B, T + n).

    `choose_next` turns the last position's logits (B, V) into ids (B,). With a `cache` the prompt is run once
    (prefill) and each later step feeds only the newest token; without one each step reruns the whole text.
    With `eos_token_id`, a finished row repeats it and the loop stops once every row has finished, as HF's
    `generate` does when pad_token_id is eos. Chapter 07's build exercise 7.2.
    """
    ids = input_ids  # (B, T) and growing
    step_input = input_ids  # with a cache: the prompt first, then one new token per step
    finished = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)  # (B,)
    for _ in range(max_new_tokens):
        logits = model(ids if cache is None else step_input, cache=cache)[:, -1, :]  # (B, V): the last position
        next_id = choose_next(logits)  # (B,)
        if eos_token_id is not None:
            next_id = next_id.masked_fill(finished, eos_token_id)  # a finished row only repeats eos
            finished |= next_id == eos_token_id
        ids = torch.cat((ids, next_id[:, None]), dim=1)  # (B, T + 1)
        if eos_token_id is not None and finished.all():
            break
        step_input = next_id[:, None]  # (B, 1)
    return ids


def _check_temperature(caller: str, temperature) -> None:
    # `not 0 <= t < inf` also catches nan, which would reach torch's sampler (HF rejects it too).
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"{caller}: temperature must be a number >= 0, not nan or inf (0 means greedy), "
                         f"got {temperature!r}")


def _check_sample_args(logits, temperature) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"sample_next_token: logits must be a (B, V) tensor, one row of next-token logits per "
                         f"sequence, got {got}; for one row use logits[None]")
    _check_temperature("sample_next_token", temperature)


def _check_generate_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, use_cache, generator,
                         eos_token_id) -> None:
    if not hasattr(model, "make_cache") or not hasattr(model, "config"):
        raise TypeError(f"generate: model must be a minillm causal LM (GPT, Llama), got {type(model).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"generate: input_ids must be a (B, T) tensor of token ids, prompts of equal length, "
                         f"got {got}; for one prompt use ids[None]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_temperature("generate", temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p must be None or a probability in (0, 1], got {top_p!r}")
    if not isinstance(use_cache, bool):
        raise TypeError(f"generate: use_cache must be True or False, got {use_cache!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generate: generator must be a torch.Generator, got {type(generator).__name__}")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < model.config.vocab_size):
        raise ValueError(f"generate: eos_token_id must be None or a token id in [0, {model.config.vocab_size}), "
                         f"got {eos_token_id!r}")


__all__ = ["decode_loop", "generate", "sample_next_token", "top_k_filter", "top_p_filter"]
