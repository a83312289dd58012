"""Llama: RMSNorm, rotary position embeddings (RoPE), a SwiGLU MLP and grouped-query attention.

Chapter 06 teaches this file top to bottom. With `sliding_window` set, each query sees only the last
`sliding_window` positions, and the same class is Mistral. Given the same weights, `Llama` reproduces HF
Transformers' `LlamaForCausalLM` and `MistralForCausalLM` (eager attention) bit for bit; `Llama.from_hf` /
`to_hf` convert (minillm.models.hf).

What changed since GPT-2 (gpt.py), one idea each: positions are rotations of q and k instead of a learned
table added to the input; RMSNorm drops LayerNorm's mean and bias; the MLP is gated; several query heads
share one key/value head (chapter 05). Parameter names are HF's (`model.layers.0.self_attn.q_proj`, ...), so
the two state dicts have the same keys. Shapes in comments: B batch, T positions, C hidden size, nh query
heads, nkv key/value heads, hd head dim, V vocabulary.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minillm import attention
from minillm.attention import GroupedQueryAttention
from minillm.cache import KVCache
from minillm.models.base import CausalLM, check_config_int, check_config_probability


@dataclass
class LlamaConfig:
    """Sizes of a Llama (or, with sliding_window, Mistral) model. The defaults are Llama-2 7B's.

    `max_seq_len` is not enforced by `forward`: RoPE has an angle for every position, so longer inputs run
    (with quality fading past the trained length), exactly as HF's `LlamaForCausalLM` runs inputs longer than
    `max_position_embeddings`. `make_cache` and `generate` do hold to it.
    """

    vocab_size: int = 32000
    max_seq_len: int = 2048           # the context length it was trained for (RoPE itself has no table)
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None   # None: as many as num_heads (no grouping)
    head_dim: int | None = None       # None: hidden_size // num_heads
    intermediate_size: int = 11008    # the SwiGLU MLP's hidden width
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0       # RoPE's base: pair i of a head turns by position * theta^(-2i/hd)
    sliding_window: int | None = None  # Mistral: a query sees only the last sliding_window positions
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0

    def __post_init__(self):
        check_config_int(self, "vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads",
                         "intermediate_size")
        check_config_int(self, "num_kv_heads", "head_dim", "sliding_window", optional=True)
        check_config_probability(self, "attention_dropout")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} must be divisible by "
                             f"num_kv_heads={self.num_kv_heads}: each key/value head serves a whole group of "
                             "query heads")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                                 f"num_heads={self.num_heads}; pass head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even: RoPE rotates pairs of "
                             "dimensions")
        self.rope_theta = float(self.rope_theta)
        if not self.rope_theta > 1.0:
            raise ValueError(f"LlamaConfig: rope_theta must be > 1, got {self.rope_theta}")
        self.rms_norm_eps = float(self.rms_norm_eps)


# ----------------------------------------------------------------------------------------------- RMSNorm
class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight (Zhang & Sennrich, 2019): LayerNorm without centring and bias.

    Computed in float32 whatever the input dtype, then cast back, as HF's `LlamaRMSNorm` does. The eps sits
    inside the square root, and Llama's is 1e-6 (LayerNorm's usual 1e-5 changes logits by ~5e-3).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C), RMS of 1
        return self.weight * x32.to(x.dtype)


# -------------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, hd) for the rotations at `positions` (T,), in HF's half-split layout.

    Dimension pair i of a head is rotated by the angle position * theta^(-2i/hd): pair 0 turns one radian per
    position, the last pair barely moves over thousands, so the pairs read position at many scales like the
    hands of a clock. Columns i and i + hd/2 hold the same angle, because rotate_half pairs them up.
    Angles are computed in float32 (then cast to `dtype`), as HF does: in bf16, position 1000's angle would
    be off by several radians.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    angles = positions[:, None].float() * inv_freq  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90° turn of every pair (x1[i], x2[i])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hd/2]) of every head of x (B, heads, T, hd) by its angle (cos, sin (T, hd)).

    (a, b) turned by θ is (a cos θ - b sin θ, b cos θ + a sin θ): x * cos + rotate_half(x) * sin. Rotating
    q at position m and k at position n makes q·k depend on m - n only: attention sees relative positions.
    The original RoPE paper pairs neighbours (x[2i], x[2i+1]); HF's checkpoints pair the halves, and loading
    them with the other layout is wrong by about 13 on the logits.
    """
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------- the block
class LlamaAttention(GroupedQueryAttention):
    """Chapter 05's grouped-query attention with RoPE applied to q and k between projection and attention."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config.hidden_size, config.num_heads, config.num_kv_heads, head_dim=config.head_dim,
                         bias=config.attention_bias, dropout=config.attention_dropout)
        self.layer_idx = layer_idx  # which of the KV cache's layers is this one's

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.project_qkv(x)  # (B, nh, T, hd), (B, nkv, T, hd), (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # v carries content, not position: no turn
        # k and v keep the (B, T, nkv, hd) memory layout of their projection. HF's forward copies them into
        # its KV cache (use_cache=True is its default), and q @ kᵀ with a contiguous k can round differently
        # (~1e-7) from the same product with a strided one: copying as HF does keeps the logits bit-identical.
        if cache is None:
            k, v = k.contiguous(), v.contiguous()
        else:  # chapter 07: store this step's (rotated) k and v, attend to the cached ones too
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, T_k, hd), T_k = kept + T
        dropout_p = self.dropout if self.training else 0.0
        keywords = attention.model_keywords(q, dropout_p)  # softmax in float32 for bf16/fp16, as HF Llama
        y = attention.scaled_dot_product_attention(q, k, v, mask, **keywords)  # (B, nh, T, hd)
        return self.project_out(y)  # (B, T, C)


class SwiGLU(nn.Module):
    """The gated MLP of Llama (Shazeer, 2020): down(silu(gate(x)) * up(x)).

    Two parallel projections to intermediate_size; one, through SiLU, decides per unit how much of the
    other passes. Three matrices instead of two, so intermediate_size is about 8/3 C instead of 4 C for the
    same parameter count.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, C)


class LlamaBlock(nn.Module):
    """Pre-norm block as GPT-2's, with RMSNorm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # (B, T, C)
        x = x + self.mlp(self.post_attention_layernorm(x))  # (B, T, C)
        return x


# --------------------------------------------------------------------------------------------- the model
class Llama(CausalLM):
    """Llama / Mistral language model: `model(input_ids, attention_mask=None, cache=None)` -> logits (B, T, V)."""

    model_type = "llama"
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama needs a LlamaConfig, got {type(config).__name__}")
        super().__init__(config)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) of token ids -> logits (B, T, vocab_size); row t scores the token after position t.

        `attention_mask` (B, T) holds 1 for tokens and 0 for padding; pad keys are hidden from every query.
        Positions count from 0 at the first column, as in HF when no position ids are given. With a `cache`
        (chapter 07) the input continues the cached text: RoPE turns it by positions cache.length onwards,
        it attends to the cached keys too (the last sliding_window - 1 of them for Mistral), and
        `attention_mask`, if given, covers the cached positions as well: (B, cache.length + T).
        """
        past = self.check_cache(cache)
        B, T = self.check_inputs(input_ids, attention_mask, num_past=past)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        positions = torch.arange(past, past + T, device=input_ids.device)  # (T,): after the cached ones
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)  # (T, hd)
        num_kept = 0 if cache is None else cache.num_kept()
        mask = self.build_mask(T, attention_mask, self.config.sliding_window, device=input_ids.device,
                               num_kept=num_kept)  # (T, T_k) or (B, 1, T, T_k)
        x = self.run_blocks(x, cos, sin, mask, cache)  # (B, T, C)
        x = self.model.norm(x)
        return self.lm_head(x)  # (B, T, V)

    @classmethod
    def from_hf(cls, hf_model) -> "Llama":
        """A Llama with the config and weights of a transformers `LlamaForCausalLM` or `MistralForCausalLM`."""
        from minillm.models.hf import llama_from_hf  # imports transformers (seconds), so only when asked
        return llama_from_hf(hf_model)

    def to_hf(self, attn_implementation: str = "eager"):
        """This model as `MistralForCausalLM` (with a sliding window) or `LlamaForCausalLM` (without)."""
        from minillm.models.hf import llama_to_hf
        return llama_to_hf(self, attn_implementation=attn_implementation)
