"""Prefix tuning (Li & Liang, 2021): learn P key/value vectors per layer that every real token attends to.

Chapter 10 teaches this module. The base model stays frozen; what trains is a table of "virtual tokens" that
exist only as keys and values inside attention. No text is ever fed for them: each layer simply finds P extra
keys (and their values) in front of the real ones, exactly where a KV cache (chapter 07) keeps the keys of
text seen earlier. So the prefix *is* a KV cache, written once before the real tokens:

    cache = model.make_cache(B, P + T)          # minillm.cache.KVCache, the one cache type of the course
    for each layer i: cache.update(i, prefix_keys[i], prefix_values[i])     # (B, nkv, P, hd) each
    logits = model(input_ids, cache=cache)      # real tokens get positions P, P+1, ... and see the prefix

which is what PEFT 0.21 does with HF's `DynamicCache` (`PrefixTuningConfig`, `PeftModel.get_prompt`). Given
the same weights, `PrefixTuning` reproduces PEFT's logits and the prefix's gradients (GPT-2 and Llama with
grouped-query attention; tests/peft/test_prefix.py). Unlike `PeftModel.generate`, which on this stack drops the
prefix, `minillm.generation.generate(prefix_model, ids, n)` generates with it.

`VirtualTokens`, the base class, holds what prefix and prompt tuning (minillm.peft.prompt) share: a frozen
minillm causal LM, P virtual positions in front of the text, and a cache that has room for them.

Shapes: B batch, T real positions, P virtual tokens, L layers, nkv key/value heads, hd head dim, V vocabulary.
"""

import dataclasses

import torch
from torch import nn

from minillm.cache import KVCache
from minillm.models.base import CausalLM


class VirtualTokens(nn.Module):
    """A frozen minillm `CausalLM` with `num_virtual_tokens` learned positions in front of every text.

    The wrapper looks like a causal LM to its callers (`forward`, `config`, `make_cache`), so training code
    and `minillm.generation.generate` use it unchanged: they see only the real tokens. The virtual ones take up
    context, so `config.max_seq_len` is the base model's minus P.
    """

    def __init__(self, model: CausalLM, num_virtual_tokens: int):
        super().__init__()
        name = type(self).__name__
        if not isinstance(model, CausalLM):
            raise TypeError(f"{name}: model must be a minillm causal LM (GPT or Llama), got {type(model).__name__}")
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"{name}: num_virtual_tokens must be an int >= 1, got {num_virtual_tokens!r}")
        if num_virtual_tokens >= model.config.max_seq_len:
            raise ValueError(f"{name}: num_virtual_tokens={num_virtual_tokens} leaves no room for text: the model "
                             f"reads at most max_seq_len={model.config.max_seq_len} positions, virtual ones included")
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        model.requires_grad_(False)  # only the virtual tokens train

    @property
    def config(self):
        """The base model's config with max_seq_len reduced by P: the context that is left for real text."""
        base = self.model.config
        return dataclasses.replace(base, max_seq_len=base.max_seq_len - self.num_virtual_tokens)

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for `max_len` real tokens (default: as many as fit) plus the P virtual ones.

        The first `forward` with it writes the virtual tokens in; later calls continue the text.
        """
        room = self.config.max_seq_len
        max_len = room if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= room:
            raise ValueError(f"{type(self).__name__}.make_cache: max_len must be an int in [1, {room}] (the "
                             f"model's max_seq_len minus {self.num_virtual_tokens} virtual tokens), got {max_len!r}")
        return self.model.make_cache(batch_size, max_len=self.num_virtual_tokens + max_len)

    def check_text(self, input_ids: torch.Tensor, cache: KVCache | None) -> tuple[int, int]:
        """Return (B, T) of input_ids after checking that the text still fits next to the virtual tokens."""
        name = type(self).__name__
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"{name}: input_ids must be a (B, T) tensor of token ids, got {got}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"{name}: cache must be a KVCache from {name}.make_cache(B), got {type(cache).__name__}")
        B, T = input_ids.shape
        seen = self.num_virtual_tokens if cache is None or cache.length == 0 else cache.length
        if seen + T > self.model.config.max_seq_len:
            raise ValueError(f"{name}: {seen - self.num_virtual_tokens} cached + {T} new tokens after "
                             f"{self.num_virtual_tokens} virtual ones exceed the model's max_seq_len="
                             f"{self.model.config.max_seq_len}; shorten the text to at most {self.config.max_seq_len}")
        if cache is not None and cache.length == 0 and cache.max_len < self.num_virtual_tokens + T:
            raise ValueError(f"{name}: the cache holds {cache.max_len} positions, too few for "
                             f"{self.num_virtual_tokens} virtual + {T} real tokens; use {name}.make_cache(B)")
        return B, T

    def with_virtual_mask(self, attention_mask: torch.Tensor | None, B: int) -> torch.Tensor | None:
        """Prepend P ones to a (B, T) attention_mask: every text may attend to every virtual token (as PEFT)."""
        if attention_mask is None:
            return None
        ones = attention_mask.new_ones(B, self.num_virtual_tokens)  # (B, P)
        return torch.cat((ones, attention_mask), dim=1)  # (B, P + T)


class PrefixTuning(VirtualTokens):
    """Trainable per-layer key/value prefixes in front of a frozen GPT or Llama (PEFT's `PrefixTuningConfig`).

    `embedding.weight` (P, 2·L·nkv·hd) is the table of every layer's prefix keys and values, laid out as PEFT's
    [layer][key, value][head][hd]; nkv is the number of key/value heads, so with grouped-query attention a
    prefix is as small as the keys it stands beside. Like PEFT it starts as N(0, 1) (an `nn.Embedding`).

    With `prefix_projection=True` the table is instead computed by a small MLP (PEFT's reparameterisation,
    Li & Liang §4.3): `embedding` (P, nkv·hd) -> Linear(nkv·hd, encoder_hidden_size) -> tanh ->
    Linear(encoder_hidden_size, 2·L·nkv·hd). The MLP shares parameters across positions, which the paper found
    steadies training; after training it could be run once and thrown away.

    Gradient checkpointing cannot be combined with it: the prefix enters through the model's KV cache.
    """

    def __init__(self, model: CausalLM, num_virtual_tokens: int, prefix_projection: bool = False,
                 encoder_hidden_size: int | None = None):
        super().__init__(model, num_virtual_tokens)
        if not isinstance(prefix_projection, bool):
            raise TypeError(f"PrefixTuning: prefix_projection must be True or False, got {prefix_projection!r}")
        if encoder_hidden_size is not None and not prefix_projection:
            raise ValueError("PrefixTuning: encoder_hidden_size is the width of the prefix_projection MLP; pass "
                             "prefix_projection=True or leave encoder_hidden_size as None")
        config = model.config
        self.num_layers, self.head_dim = config.num_layers, config.head_dim
        self.num_kv_heads = getattr(config, "num_kv_heads", config.num_heads)  # GPT-2 has no GQA
        kv_dim = self.num_kv_heads * self.head_dim  # the width of one layer's keys (and of its values)
        table_dim = 2 * self.num_layers * kv_dim
        if encoder_hidden_size is None:
            encoder_hidden_size = kv_dim  # PEFT's default
        if isinstance(encoder_hidden_size, bool) or not isinstance(encoder_hidden_size, int) or encoder_hidden_size < 1:
            raise ValueError(f"PrefixTuning: encoder_hidden_size must be an int >= 1, got {encoder_hidden_size!r}")
        self.prefix_projection = prefix_projection
        device = model.lm_head.weight.device
        # Trainable weights stay float32 whatever the model's dtype (as PEFT): small updates survive rounding.
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(kv_dim, encoder_hidden_size, device=device), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size, table_dim, device=device))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, table_dim, device=device)

    def prefix_key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's prefix keys and values: a list of L pairs of (B, nkv, P, hd) tensors, model dtype.

        The table is looked up for each row of the batch, as PEFT does, so the prefix's gradient is summed
        over the batch by the embedding's backward, in the same order.
        """
        P = self.num_virtual_tokens
        tokens = torch.arange(P, device=self.embedding.weight.device).expand(batch_size, P)  # (B, P)
        table = self.embedding(tokens)  # (B, P, kv_dim) or (B, P, 2·L·nkv·hd)
        if self.prefix_projection:
            table = self.transform(table)  # (B, P, 2·L·nkv·hd)
        table = table.to(self.model.lm_head.weight.dtype)
        table = table.view(batch_size, P, 2 * self.num_layers, self.num_kv_heads, self.head_dim)
        table = table.permute(2, 0, 3, 1, 4)  # (2L, B, nkv, P, hd): keys of layer i at 2i, values at 2i + 1
        return [(table[2 * i], table[2 * i + 1]) for i in range(self.num_layers)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) for the real tokens, which sit at positions P, P+1, ...

        Without a cache, a fresh one holds the prefix for this call. With one from `make_cache`, the first
        call writes the prefix into it (prefill) and later calls continue the text (decoding), so
        `minillm.generation.generate` works unchanged. `attention_mask` (B, T), or (B, cached + T) when
        decoding, covers the real tokens only; the prefix is always visible.
        """
        B, T = self.check_text(input_ids, cache)
        if cache is None:
            cache = self.model.make_cache(B, max_len=self.num_virtual_tokens + T)
        if cache.length == 0:  # a new text: the prefix comes first, as if P tokens had been read already
            for layer, (k, v) in enumerate(self.prefix_key_values(B)):
                cache.update(layer, k, v)
        return self.model(input_ids, attention_mask=self.with_virtual_mask(attention_mask, B), cache=cache)


__all__ = ["PrefixTuning", "VirtualTokens"]
