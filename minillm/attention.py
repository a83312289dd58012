"""Scaled dot-product attention with boolean masks, multi-head and grouped-query attention.

Chapter 05 teaches this module; the models (chapter 06), generation with a KV cache (chapter 07) and prefix
tuning (chapter 10) build on it. It matches `torch.nn.functional.scaled_dot_product_attention` for every
mask below and reproduces HF Mistral's eager sliding-window attention bit for bit.

Conventions used throughout:

- Shapes are (B, nh, T, hd): batch, heads, positions, head dim. Keys and values may have fewer heads than
  the queries (grouped-query attention); `repeat_kv` widens them.
- A mask is a `torch.bool` tensor, **True = may attend**, broadcastable to (B, nh, T_q, T_k). The builders
  return (T_q, T_k) masks (the same for every sequence) or, for padding, (B, 1, 1, T_k); `combine_masks`
  (or plain `&`) joins them into (B, 1, T_q, T_k). Note that `nn.MultiheadAttention` uses the opposite
  convention (True = blocked); `F.scaled_dot_product_attention` uses ours.
- Key j sits at absolute position j. Query i sits at absolute position `offset + i`. The default offset,
  T_k - T_q, makes the queries the *last* T_q positions: exactly the situation of a decoding step whose keys
  include everything cached before it (chapter 07).
"""

import torch
from torch import nn


# ----------------------------------------------------------------------------------------- masks
def causal_mask(T_q: int, T_k: int | None = None, offset: int | None = None, device=None) -> torch.Tensor:
    """(T_q, T_k) bool mask: the query at position p sees every key at a position <= p.

    With T_q == T_k this is the lower triangle. With queries after cached keys (T_q < T_k) the triangle sits
    in the bottom-right corner, which is what torch's `causal_lower_right` builds and *not* what
    `is_causal=True` does (it aligns the triangle top-left).
    """
    q_pos, k_pos = _positions(T_q, T_k, offset, device)  # (T_q, 1), (1, T_k)
    return k_pos <= q_pos  # (T_q, T_k)


def sliding_window_mask(T_q: int, T_k: int | None, window: int, offset: int | None = None,
                        device=None) -> torch.Tensor:
    """(T_q, T_k) bool mask: the query at position p sees keys p - window + 1 .. p (itself included).

    This is Mistral's sliding window as HF Transformers implements it: `window` keys in all, the query's own
    position among them. Off by one in either direction changes every row longer than the window.
    """
    _check_int("sliding_window_mask: window", window, minimum=1)
    q_pos, k_pos = _positions(T_q, T_k, offset, device)  # (T_q, 1), (1, T_k)
    return (k_pos <= q_pos) & (k_pos > q_pos - window)  # (T_q, T_k)


def strided_mask(T_q: int, T_k: int | None, stride: int, offset: int | None = None, device=None) -> torch.Tensor:
    """(T_q, T_k) bool mask of the Sparse Transformer's strided pattern (Child et al., 2019).

    The query at position p sees the previous `stride` keys (local part) and every key a multiple of `stride`
    behind it (strided part), always causally. Two such hops reach any earlier position, so two layers
    connect everything with about 2·sqrt(T) keys per query instead of T when stride ≈ sqrt(T).
    """
    _check_int("strided_mask: stride", stride, minimum=1)
    q_pos, k_pos = _positions(T_q, T_k, offset, device)  # (T_q, 1), (1, T_k)
    distance = q_pos - k_pos  # (T_q, T_k), how far back the key is
    return (distance >= 0) & ((distance < stride) | (distance % stride == 0))


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, T_k) bool mask from a (B, T_k) tensor of 1 (a real token) and 0 (padding), as tokenizers give.

    The two singleton dimensions let it broadcast over heads and queries: no query may look at a pad key.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"padding_mask: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"padding_mask: attention_mask must have shape (B, T), got {tuple(attention_mask.shape)}")
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("padding_mask: attention_mask may only hold 0 (padding) and 1 (token), "
                         f"found {sorted(set(attention_mask.unique().tolist()) - {0, 1})[:5]}")
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T_k)


def combine_masks(*masks: torch.Tensor) -> torch.Tensor:
    """A position may be attended only if every mask allows it: the `&` of all masks, broadcast together.

    `combine_masks(causal_mask(T), padding_mask(am))` is (B, 1, T, T). Same as chaining `&`, with a clear
    error when the shapes do not broadcast.
    """
    if not masks:
        raise ValueError("combine_masks: needs at least one mask")
    for mask in masks:
        _check_bool(mask, "combine_masks")
    try:
        torch.broadcast_shapes(*(m.shape for m in masks))
    except RuntimeError:
        shapes = ", ".join(str(tuple(m.shape)) for m in masks)
        raise ValueError(f"combine_masks: mask shapes {shapes} do not broadcast together") from None
    combined = masks[0]
    for mask in masks[1:]:
        combined = combined & mask
    return combined


def _positions(T_q: int, T_k: int | None, offset: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of the queries, as a column (T_q, 1), and of the keys, as a row (1, T_k)."""
    _check_int("T_q", T_q, minimum=1)
    T_k = T_q if T_k is None else T_k
    _check_int("T_k", T_k, minimum=1)
    if offset is None:
        if T_q > T_k:
            raise ValueError(f"T_q={T_q} queries cannot be the last positions of T_k={T_k} keys; "
                             "pass offset= (the absolute position of the first query) explicitly")
        offset = T_k - T_q
    _check_int("offset", offset, minimum=0)
    q_pos = torch.arange(offset, offset + T_q, device=device)[:, None]  # (T_q, 1)
    k_pos = torch.arange(T_k, device=device)[None, :]  # (1, T_k)
    return q_pos, k_pos


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_bool(mask, where: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{where}: a mask must be a torch.bool tensor (True = may attend), got {got}; "
                        "for a 0/1 attention_mask from a tokenizer use padding_mask()")


# ------------------------------------------------------------------------------------- attention
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hd) -> (B, nkv * n_rep, T, hd): kv head j serves query heads j*n_rep .. j*n_rep + n_rep-1.

    Each kv head's copies sit next to each other (the values of `x.repeat_interleave(n_rep, dim=1)`), the
    layout Llama, Mistral and torch's `enable_gqa=True` use. Tiling (`x.repeat(1, n_rep, 1, 1)`) would hand kv
    head j to query heads j, j+nkv, … and silently pair every loaded checkpoint's heads wrongly.
    We build it as HF does, expand + reshape: with one kv head that is a zero-stride view, not a copy, and
    a matmul rounds the two memory layouts differently, so only this form is bitwise equal to HF eager.
    """
    _check_int("repeat_kv: n_rep", n_rep, minimum=1)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"repeat_kv: x must have shape (B, num_kv_heads, T, head_dim), got {got}")
    if n_rep == 1:
        return x
    B, nkv, T, hd = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, T, hd).reshape(B, nkv * n_rep, T, hd)  # (B, nkv * n_rep, T, hd)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                      scale: float | None = None, softmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) over the keys a mask allows: (B, nh, T_q, T_k), each row summing to 1.

    A query whose keys are *all* masked (a pad position under left padding, say) has nothing to average;
    its row is all zeros, so its attention output is the zero vector and no NaN reaches the loss or the
    gradients. torch's SDPA makes the same choice (since 2.5); a plain softmax over -inf gives NaN, and
    HF eager (which adds the most negative float instead of -inf) gives a uniform average over the masked keys.
    `softmax_dtype` is the dtype the softmax runs in (see `scaled_dot_product_attention`).
    """
    n_rep = _check_qk(q, k)
    k = repeat_kv(k, n_rep)  # (B, nh, T_k, hd)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    # Without the scale, a dot product of hd unit-variance numbers has variance hd, and softmax saturates.
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T_q, T_k)
    dtype = default_softmax_dtype(scores.dtype) if softmax_dtype is None else softmax_dtype
    if mask is None:
        return torch.softmax(scores, dim=-1, dtype=dtype).to(q.dtype)
    _check_mask(mask, scores.shape)
    has_key = mask.any(dim=-1, keepdim=True)  # (..., T_q, 1): does this query see any key at all?
    # exp(-inf) = 0 removes a masked key exactly. A row with no key left gets finite scores instead (its
    # softmax would be 0/0 = NaN) and its weights are zeroed afterwards.
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    # torch.softmax subtracts the row maximum before exp, the stable softmax of chapter 05, in one fused
    # kernel; using it (not a hand-written copy) keeps our models bit-identical to HF eager (chapter 06).
    weights = torch.softmax(scores, dim=-1, dtype=dtype)  # (B, nh, T_q, T_k)
    return weights.masked_fill(~has_key, 0.0).to(q.dtype)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, scale: float | None = None,
                                 dropout_p: float = 0.0, generator: torch.Generator | None = None,
                                 softmax_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention output softmax(q kᵀ / sqrt(hd)) v: (B, nh, T_q, hd_v).

    q is (B, nh, T_q, hd); k is (B, nkv, T_k, hd) and v is (B, nkv, T_k, hd_v) with nkv dividing nh (nkv < nh
    is grouped-query attention). `mask` is a bool mask, True = may attend, broadcastable to (B, nh, T_q, T_k).
    `scale` defaults to hd ** -0.5. Dropout, if any, drops attention weights (drawing from `generator`) and
    rescales the rest by 1 / (1 - dropout_p). Matches `torch.nn.functional.scaled_dot_product_attention`
    (`attn_mask=mask, enable_gqa=True`); chapter 05 teaches it.

    `softmax_dtype` matters for half precision only: by default (None) bf16/fp16 scores are normalised in
    float32 and the weights cast back, as HF's Llama and Mistral do; HF's GPT-2 normalises them in their own
    dtype and so passes `softmax_dtype=q.dtype`. The logits barely notice; bf16 gradients differ by ~1e-3.

    Every minillm model calls this function as `attention.scaled_dot_product_attention` (looked up at call
    time) with the keywords of `model_keywords`: that is the seam `minillm.exercises.use(attention=...)` swaps.
    """
    _check_kv(k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    weights = attention_weights(q, k, mask, scale, softmax_dtype)  # (B, nh, T_q, T_k)
    if dropout_p > 0.0:
        keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
        weights = weights * keep / (1.0 - dropout_p)  # unbiased: the expected weights are unchanged
    v = repeat_kv(v, q.size(1) // v.size(1))  # (B, nh, T_k, hd_v)
    return weights @ v  # (B, nh, T_q, hd_v)


def default_softmax_dtype(scores_dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision scores (HF Llama's and Mistral's choice), the scores' own dtype otherwise."""
    return torch.promote_types(scores_dtype, torch.float32)


def model_keywords(q: torch.Tensor, dropout_p: float = 0.0, generator: torch.Generator | None = None,
                   softmax_dtype: torch.dtype | None = None) -> dict:
    """The keywords a model passes to `scaled_dot_product_attention` besides (q, k, v, mask): only those that
    change its result for these queries.

    An fp32 model in eval mode passes none at all, so a plain four-argument `attention(q, k, v, mask)` (chapter
    05's build exercise) can stand in for ours there; dropout while training, and GPT-2's softmax dtype in
    half precision, are passed only when they are in play.
    """
    keywords = {}
    if dropout_p > 0.0:
        keywords.update(dropout_p=dropout_p, generator=generator)
    if softmax_dtype is not None and softmax_dtype != default_softmax_dtype(q.dtype):
        keywords["softmax_dtype"] = softmax_dtype
    return keywords


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> int:
    """Validate q (B, nh, T_q, hd) against k (B, nkv, T_k, hd); return how many query heads share a kv head."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have shape (B, heads, T, head_dim), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got {t.dtype}")
    if q.dtype != k.dtype:
        raise TypeError(f"attention: q and k must share a dtype, got q {q.dtype} and k {k.dtype}")
    if q.size(0) != k.size(0) or q.size(-1) != k.size(-1):
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch size "
                         "(dim 0) and head_dim (dim 3)")
    if q.size(1) % k.size(1) != 0:
        raise ValueError(f"attention: q {tuple(q.shape)} has {q.size(1)} heads, which is not a multiple of the "
                         f"{k.size(1)} kv heads of k {tuple(k.shape)}; num_heads must be divisible by num_kv_heads")
    return q.size(1) // k.size(1)


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(v, torch.Tensor) or v.dim() != 4:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"attention: v must have shape (B, kv_heads, T, head_dim), got {got}")
    if isinstance(k, torch.Tensor) and k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must agree on batch, kv heads "
                         "and length (dims 0-2)")
    if isinstance(k, torch.Tensor) and k.dtype != v.dtype:
        raise TypeError(f"attention: k and v must share a dtype, got k {k.dtype} and v {v.dtype}")


def _check_mask(mask: torch.Tensor, scores_shape: torch.Size) -> None:
    _check_bool(mask, "attention")
    try:
        fits = torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"attention: mask {tuple(mask.shape)} does not broadcast to the scores "
                         f"(B, nh, T_q, T_k) = {tuple(scores_shape)}")


# --------------------------------------------------------------------------------------- modules
class GroupedQueryAttention(nn.Module):
    """Self-attention with `num_heads` query heads sharing `num_kv_heads` key/value heads (Ainslie et al., 2023).

    num_kv_heads == num_heads is classic multi-head attention; num_kv_heads == 1 is multi-query attention.
    The parameter names `q_proj`, `k_proj`, `v_proj`, `o_proj` are HF Llama's and Mistral's, so their
    attention weights load by name (chapter 06). `project_qkv` and `project_out` are separate so that a model
    can rotate q and k (RoPE) or extend k and v from a cache in between. Chapter 05 teaches this.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 bias: bool = False, dropout: float = 0.0):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            _check_int(f"{type(self).__name__}: {name}", value, minimum=1)
        if num_heads % num_kv_heads != 0:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(f"{type(self).__name__}: num_heads={num_heads} is not divisible by "
                             f"num_kv_heads={num_kv_heads}; every kv head must serve the same number of query "
                             f"heads, so num_kv_heads must be one of {divisors}")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"{type(self).__name__}: hidden_size={hidden_size} is not divisible by "
                                 f"num_heads={num_heads}; pass head_dim explicitly")
            head_dim = hidden_size // num_heads
        _check_int(f"{type(self).__name__}: head_dim", head_dim, minimum=1)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q (B, nh, T, hd), k and v (B, nkv, T, hd): one matmul each, then split into heads."""
        if x.dim() != 3 or x.size(-1) != self.hidden_size:
            raise ValueError(f"{type(self).__name__}: x must have shape (B, T, hidden_size={self.hidden_size}), "
                             f"got {tuple(x.shape)}")
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        return q, k, v

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hd) -> (B, T, C): heads side by side again, then the output projection mixes them."""
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))  # (B, T, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C). `mask` as in `scaled_dot_product_attention`, e.g. `causal_mask(T)`."""
        q, k, v = self.project_qkv(x)  # (B, nh, T, hd), (B, nkv, T, hd), (B, nkv, T, hd)
        dropout_p = self.dropout if self.training else 0.0
        y = scaled_dot_product_attention(q, k, v, mask, **model_keywords(q, dropout_p, generator))  # (B, nh, T, hd)
        return self.project_out(y)


class MultiHeadAttention(GroupedQueryAttention):
    """Classic multi-head self-attention (Vaswani et al., 2017): every query head has its own key/value head.

    It is grouped-query attention with num_kv_heads == num_heads. Chapter 05 teaches this.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, bias: bool = False,
                 dropout: float = 0.0):
        super().__init__(hidden_size, num_heads, num_heads, head_dim=head_dim, bias=bias, dropout=dropout)
