"""Prompt tuning (Lester et al., 2021): learn P input embeddings ("soft prompt") put in front of every text.

Chapter 10 teaches this module, after prefix tuning (minillm.peft.prefix): where a prefix gives every layer
its own learned keys and values, a soft prompt is learned only at the input. The P vectors enter the first
block as if they were the embeddings of P tokens, and the frozen model computes their keys and values in
every layer itself. P·C parameters in all, C the hidden size: the smallest of the chapter's methods.

minillm's models read token ids, not embeddings. Rather than give each model a second input path, the
wrapper feeds P placeholder ids in front of the text and, for that one call, hooks the token embedding
layer so that its first P output rows are the soft prompt. Everything after the embedding (positions 0..P-1
for the virtual tokens, P.. for the text, the causal mask) is the model's own code.

Given the same weights, `PromptTuning` reproduces PEFT 0.21's `PromptTuningConfig` model: logits and the soft
prompt's gradient (GPT-2, Llama; tests/peft/test_prompt.py). Unlike `PeftModel.generate`, which on this stack
prepends the soft prompt again at every decoding step, `minillm.generation.generate(prompt_model, ids, n)`
puts it in the KV cache once.

Shapes: B batch, T real positions, P virtual tokens, C hidden size, V vocabulary.
"""

from contextlib import contextmanager

import torch
from torch import nn

from minillm.cache import KVCache
from minillm.models.base import CausalLM
from minillm.peft.prefix import VirtualTokens

INITS = ("random", "vocab", "text")


def input_embedding(model: CausalLM) -> nn.Embedding:
    """The token embedding table of a minillm GPT (`transformer.wte`) or Llama (`model.embed_tokens`)."""
    for path in ("transformer.wte", "model.embed_tokens"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise TypeError(f"no token embedding found in {type(model).__name__}: expected a minillm GPT or Llama")


class PromptTuning(VirtualTokens):
    """A trainable soft prompt `embedding.weight` (P, C) in front of a frozen GPT or Llama.

    `init` chooses its starting point, as PEFT's `prompt_tuning_init`:
    - "random": N(0, 1), an `nn.Embedding`'s default (far larger than trained token embeddings, ~0.02 in
      GPT-2: PEFT warns that such vectors may lie off the embedding manifold);
    - "vocab": the embeddings of P token ids drawn uniformly from the vocabulary (torch's global generator);
    - "text": the embeddings of `tokenizer.encode(init_text)`, repeated or cut to P tokens (Lester et al.
      found a task description a good start).
    The soft prompt is kept in float32 whatever the model's dtype, as in PEFT.
    """

    def __init__(self, model: CausalLM, num_virtual_tokens: int, init: str = "random", init_text: str | None = None,
                 tokenizer=None):
        super().__init__(model, num_virtual_tokens)
        if init not in INITS:
            raise ValueError(f"PromptTuning: init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
        if init != "text" and (init_text is not None or tokenizer is not None):
            raise ValueError(f"PromptTuning: init_text and tokenizer are only used with init='text', got init={init!r}")
        words = input_embedding(model)  # (V, C)
        self.embedding = nn.Embedding(num_virtual_tokens, words.embedding_dim, device=words.weight.device)
        if init != "random":
            ids = self._init_ids(init, words.num_embeddings, init_text, tokenizer)  # (P,)
            self.embedding.weight = nn.Parameter(words.weight[ids].detach().clone().float())

    def _init_ids(self, init: str, vocab_size: int, init_text: str | None, tokenizer) -> torch.Tensor:
        """The P token ids whose embeddings start the soft prompt."""
        P = self.num_virtual_tokens
        if init == "vocab":
            return torch.randint(0, vocab_size, (P,))
        if tokenizer is None or not hasattr(tokenizer, "encode"):
            raise ValueError("PromptTuning: init='text' needs tokenizer= (an object with encode(text) -> ids, e.g. "
                             f"minillm's BPETokenizer), got {tokenizer!r}")
        if not isinstance(init_text, str) or not init_text:
            raise ValueError(f"PromptTuning: init='text' needs a non-empty init_text, got {init_text!r}")
        ids = list(tokenizer.encode(init_text))
        if not ids or min(ids) < 0 or max(ids) >= vocab_size:
            raise ValueError(f"PromptTuning: the tokenizer turned init_text into ids {ids[:8]}..., which must be "
                             f"non-empty and inside the model's vocabulary [0, {vocab_size}): wrong tokenizer?")
        repeats = -(-P // len(ids))  # ceil: cycle a short text, cut a long one
        return torch.tensor((ids * repeats)[:P])

    def prepend_soft_prompt(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, T, C) embeddings of the real tokens -> (B, P + T, C): the soft prompt in front of every row.

        What PEFT does to `inputs_embeds`: the float32 soft prompt is shared by every row of the batch, then cast
        to the model's dtype. In that order the backward casts each row's gradient to float32 before summing
        over the batch; casting first would sum in the model's dtype (bfloat16: 8 bits). Chapter 10 has the
        learner write it.
        """
        B = token_embeddings.size(0)
        prompt = self.embedding.weight.expand(B, -1, -1).to(token_embeddings.dtype)  # (B, P, C)
        return torch.cat((prompt, token_embeddings), dim=1)  # (B, P + T, C)

    @contextmanager
    def _soft_prompt_in_embeddings(self):
        """While active, the token embedding layer's output rows 0..P-1 are replaced by the soft prompt."""
        P = self.num_virtual_tokens

        def replace_first_rows(module, args, output):  # output (B, P + T, C), rows 0..P-1 from placeholder ids
            return self.prepend_soft_prompt(output[:, P:])  # (B, P + T, C)

        handle = input_embedding(self.model).register_forward_hook(replace_first_rows)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) for the real tokens only (the soft prompt's own rows dropped).

        The text sits at positions P, P+1, ... after the soft prompt. With a cache from `make_cache`, the first
        call runs the soft prompt and the text (prefill) and later calls continue the text: the soft prompt is
        read once and lives on as keys and values in the cache. `attention_mask` (B, T), or (B, cached + T)
        when decoding, covers the real tokens only.
        """
        B, T = self.check_text(input_ids, cache)
        mask = self.with_virtual_mask(attention_mask, B)
        if cache is not None and cache.length > 0:  # decoding: the soft prompt is already in the cache
            return self.model(input_ids, attention_mask=mask, cache=cache)
        placeholders = input_ids.new_zeros(B, self.num_virtual_tokens)  # (B, P): rows the hook replaces
        with self._soft_prompt_in_embeddings():
            logits = self.model(torch.cat((placeholders, input_ids), dim=1), attention_mask=mask, cache=cache)
        return logits[:, self.num_virtual_tokens:].contiguous()  # (B, T, V), contiguous so callers may .view it


__all__ = ["INITS", "PromptTuning", "input_embedding"]
