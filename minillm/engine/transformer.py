"""A GPT-2 style transformer block built only from engine parts.

Chapter 03 closes with this: everything a transformer needs (matmul, softmax, masking, layer norm, GELU)
already exists in the engine, so a block is just a composition of modules. Parameter names follow
GPT-2 / nanoGPT (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_1``, ``ln_2``), so a
torch block with the same names loads our state_dict 1:1. Chapter 06 builds the torch version for real.
"""

from __future__ import annotations

import math

import numpy as np

from minillm.engine import functional as F
from minillm.engine.nn import GELU, LayerNorm, Linear, Module
from minillm.engine.tensor import Tensor


class CausalSelfAttention(Module):
    """Multi-head self-attention in which position t attends only to positions <= t."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"CausalSelfAttention: d_model={d_model} must be divisible by "
                             f"num_heads={num_heads}")
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.c_attn = Linear(d_model, 3 * d_model)  # query, key and value projections in one matmul
        self.c_proj = Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape  # batch, sequence length, d_model
        nh, hs = self.num_heads, self.head_dim
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]  # each (B, T, C)
        # Split C into nh heads of size hs and move heads next to batch: every head attends independently.
        q = q.reshape(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.reshape(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.reshape(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)

        # Dividing by sqrt(hs) keeps the scores' variance near 1, so softmax does not saturate.
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
        future = np.triu(np.ones((T, T), dtype=bool), k=1)  # True above the diagonal: keys after the query
        att = att.masked_fill(future, float("-inf"))  # exp(-inf) = 0: no weight on the future
        att = F.softmax(att, dim=-1)  # (B, nh, T, T), each row sums to 1
        y = att @ v  # (B, nh, T, hs)

        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)  # (B, T, C)


class FeedForward(Module):
    """The block's MLP: widen to 4 * d_model, GELU (tanh form, as GPT-2), project back."""

    def __init__(self, d_model: int):
        super().__init__()
        self.c_fc = Linear(d_model, 4 * d_model)
        self.gelu = GELU(approximate="tanh")
        self.c_proj = Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(Module):
    """Pre-LN transformer block (GPT-2): ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Normalising before each sub-layer, not after, leaves the residual path untouched from input to
    output, which is what lets deep stacks of these blocks train.
    """

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads)
        self.ln_2 = LayerNorm(d_model)
        self.mlp = FeedForward(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x
