"""GPT-2: learned positions, pre-LayerNorm blocks, the tanh GELU, tied input/output embeddings.

Chapter 06 teaches this file top to bottom. Given the same weights, `GPT` reproduces HF Transformers'
`GPT2LMHeadModel` (eager attention) bit for bit; `GPT.from_hf` / `to_hf` convert (minillm.models.hf).

Parameter names follow HF's GPT-2 (`transformer.h.0.attn.c_attn`, ...), as nanoGPT's do, so that a reader can
put the two state dicts side by side and PEFT finds the same layers. Shapes in comments: B batch, T positions,
C hidden size, nh heads, hd head dim (C = nh * hd), V vocabulary.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from minillm import attention
from minillm.cache import KVCache
from minillm.models.base import CausalLM, check_config_int, check_config_probability


@dataclass
class GPTConfig:
    """Sizes of a GPT-2 model. The defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50257
    max_seq_len: int = 1024          # rows of the learned position table: the longest input it can read
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int | None = None  # the MLP's hidden width; None means 4 * hidden_size, as in GPT-2
    dropout: float = 0.0             # on embeddings, attention weights and both residual branches
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_config_int(self, "vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads")
        check_config_int(self, "intermediate_size", optional=True)
        check_config_probability(self, "dropout")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"GPTConfig: hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads}: the heads split the hidden vector into equal parts")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation, x * Φ(x) ≈ ½x(1 + tanh(√(2/π)(x + 0.044715x³))), the one GPT-2 was trained with.

    Written out op for op as HF's `gelu_new` does (with `torch.pow(x, 3.0)`): `F.gelu(approximate="tanh")`
    is the same function but a fused kernel that rounds differently (5.7e-6 on the logits), and the exact
    erf GELU is a different function (2.6e-3).
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _store_as_in_out(linear: nn.Linear) -> None:
    """Keep `linear.weight` (out, in) as a transposed view of (in, out) memory, GPT-2's own layout.

    OpenAI's GPT-2 computed x @ W with W stored (in, out), and HF keeps that layout (its `Conv1D` calls
    `torch.addmm(b, x, W)`). A matmul's rounding depends on the order it walks memory, and for some shapes
    (one row, say) `F.linear` on an (out, in) weight sums in a different order than `addmm` on (in, out)
    memory: logits then differ in the 7th digit. With the same memory layout the two run the same kernel,
    bit for bit. The layout survives training and loading, which write into the weight in place.
    """
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())  # shape (out, in), strides (1, out)


class CausalSelfAttention(nn.Module):
    """GPT-2's multi-head attention: one fused projection makes q, k and v, `c_proj` mixes the heads."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which of the KV cache's layers is this one's
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        # One (3C, C) matmul instead of three (C, C) ones: q, k and v are its three row blocks.
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        # k and v are strided views into c_attn's output. HF's forward copies them into its KV cache
        # (use_cache=True is its default), and q @ kᵀ with a contiguous k rounds differently (~1e-7) from the
        # same product with a strided view: copying as HF does keeps the logits bit-identical.
        if cache is None:
            k, v = k.contiguous(), v.contiguous()
        else:  # chapter 07: store this step's k and v, attend to those of every earlier position too
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, T_k, hd), T_k = cached + T
        dropout_p = self.attn_dropout if self.training else 0.0
        # HF's GPT-2 takes the softmax of bf16/fp16 scores in their own dtype, not in float32 as Llama does.
        # The logits barely notice, but bf16 gradients differ by ~1e-3 (chapter 09's LoRA), so we do as GPT-2 does.
        keywords = attention.model_keywords(q, dropout_p, softmax_dtype=q.dtype)
        y = attention.scaled_dot_product_attention(q, k, v, mask, **keywords)  # (B, nh, T, hd)
        # The heads side by side again. reshape may return a strided view (when hd == 1, say), and a matmul on
        # a strided input can round differently from one on a contiguous copy, which is what HF passes.
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen to intermediate_size (4C), gelu_new, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(gelu_new(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Pre-LN (GPT-2) normalises the input of each branch and leaves the residual stream itself untouched, so
    a gradient flows from the loss to the embeddings through additions alone; the original transformer's
    post-LN (normalise after adding) needs learning-rate warmup to train at depth.
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(CausalLM):
    """GPT-2 language model: `model(input_ids, attention_mask=None, cache=None)` -> logits (B, T, vocab_size)."""

    model_type = "gpt"
    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.hidden_size),  # token embeddings
            wpe=nn.Embedding(config.max_seq_len, config.hidden_size),  # position embeddings, learned
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.num_layers)),
            ln_f=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Weight tying: the output layer scores each token by the dot product with its own input embedding.
        # One (V, C) matrix serves both ends, which saves V * C parameters (38.6M of GPT-2 small's 124M).
        self.lm_head.weight = self.transformer.wte.weight
        for block in self.transformer.h:
            for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                _store_as_in_out(linear)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two branches to the residual stream, so the projections that
        # write into it start 1/sqrt(2 * num_layers) smaller and the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) of token ids -> logits (B, T, vocab_size); row t scores the token after position t.

        `attention_mask` (B, T) holds 1 for tokens and 0 for padding, as a tokenizer returns it; pad keys are
        hidden from every query. Positions count from 0 at the first column, padded or not, as HF does when
        it is not given position ids. With a `cache` (chapter 07) the input continues the cached text: its
        positions start at `cache.length`, it attends to the cached keys too, and `attention_mask`, if
        given, covers the cached positions as well: (B, cache.length + T).
        """
        past = self.check_cache(cache)
        B, T = self.check_inputs(input_ids, attention_mask, num_past=past)
        if past + T > self.config.max_seq_len:
            raise ValueError(f"GPT: the input reaches position {past + T} but the position table has max_seq_len="
                             f"{self.config.max_seq_len} rows; crop input_ids to the last {self.config.max_seq_len}")
        positions = torch.arange(past, past + T, device=input_ids.device)  # (T,): after the cached ones
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, C)
        x = self.transformer.drop(x)
        num_kept = 0 if cache is None else cache.num_kept()
        mask = self.build_mask(T, attention_mask, device=input_ids.device, num_kept=num_kept)  # (T, T_k) or None
        x = self.run_blocks(x, mask, cache)  # (B, T, C)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)  # (B, T, V)

    @classmethod
    def from_hf(cls, hf_model) -> "GPT":
        """A GPT with the config and weights of a transformers `GPT2LMHeadModel` (see minillm.models.hf)."""
        from minillm.models.hf import gpt_from_hf  # imports transformers (seconds), so only when asked
        return gpt_from_hf(hf_model)

    def to_hf(self, attn_implementation: str = "eager"):
        """This model as a transformers `GPT2LMHeadModel` with the same weights (see minillm.models.hf)."""
        from minillm.models.hf import gpt_to_hf
        return gpt_to_hf(self, attn_implementation=attn_implementation)
