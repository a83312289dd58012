"""The functions a network is built from, named and behaving like `torch.nn.functional`.

Chapter 02 teaches why some of them are single fused ops instead of compositions of Tensor ops:
`log_softmax` and `cross_entropy` stay finite for huge logits, and their backward is one short formula
(softmax minus one-hot) instead of a chain of broadcasts. Chapter 03 builds layers on top of them.
"""

import math

import numpy as np

from .random import default_generator
from .tensor import Tensor, _dims


def relu(x: Tensor) -> Tensor:
    return x.relu()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    # Subtracting the max changes nothing mathematically but keeps exp() from overflowing.
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def stable_softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of a numpy array, like `torch.softmax(x, dim=-1)`, finite for huge scores.

    Chapter 00's build exercise 0.1: `softmax` below calls it (looked up at call time), so the learner's
    version runs inside the engine's attention.
    """
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # every exponent <= 0: nothing overflows
    return e / e.sum(axis=-1, keepdims=True)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    (axis,) = _dims(dim, x.ndim, "softmax")
    out = np.moveaxis(stable_softmax(np.moveaxis(x.data, axis, -1)), -1, axis)  # softmax along `axis`

    def backward(g):  # the Jacobian diag(s) - s sᵀ applied to g
        return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)

    return Tensor._op(out, (x,), backward, "softmax")


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    (axis,) = _dims(dim, x.ndim, "log_softmax")
    out = _log_softmax(x.data, axis)

    def backward(g):
        return (g - np.exp(out) * g.sum(axis=axis, keepdims=True),)

    return Tensor._op(out, (x,), backward, "log_softmax")


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer `targets` (N,) under `logits` (N, C), like `F.cross_entropy`.

    Rows whose target is `ignore_index` add nothing; "mean" divides by the number of other rows.
    """
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must have shape (N, C), got {logits.shape}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    t = targets.data if isinstance(targets, Tensor) else np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class indices (int32/int64), got {t.dtype}")
    num_rows, num_classes = logits.shape
    if t.shape != (num_rows,):
        raise ValueError(f"cross_entropy: logits shape {logits.shape} needs targets of shape ({num_rows},), "
                         f"got {t.shape}")
    valid = t != ignore_index
    out_of_range = valid & ((t < 0) | (t >= num_classes))
    if out_of_range.any():
        row = int(np.argmax(out_of_range))
        raise ValueError(f"cross_entropy: target {t[row]} (row {row}) is out of range for {num_classes} classes; "
                         f"allowed 0..{num_classes - 1} or ignore_index={ignore_index}")
    rows = np.flatnonzero(valid)
    cols = t[rows]
    logp = _log_softmax(logits.data, axis=1)  # (N, C)
    losses = -logp[rows, cols]  # (n_valid,)
    if reduction == "none":
        out = np.zeros(num_rows, dtype=logits.dtype)
        out[rows] = losses
    elif reduction == "sum":
        out = losses.sum()
    else:  # like torch, the mean over zero rows is nan
        out = losses.sum() / len(rows) if len(rows) else np.array(np.nan, dtype=logits.dtype)

    def backward(g):
        # d loss_i / d logits_i = softmax_i - onehot(target_i), scaled by the weight reduction gave row i.
        weight = np.zeros(num_rows, dtype=logits.dtype)  # (N,)
        if reduction == "none":
            weight[rows] = g[rows]
        else:
            weight[rows] = g if reduction == "sum" else g / max(len(rows), 1)  # all ignored: no rows
        grad = np.exp(logp) * weight[:, None]  # (N, C)
        grad[rows, cols] -= weight[rows]
        return (grad,)

    return Tensor._op(out, (logits,), backward, "cross_entropy")


_GELU_SCALE = math.sqrt(2.0 / math.pi)


def gelu(x: Tensor) -> Tensor:
    """GELU in its tanh form: torch's `F.gelu(x, approximate="tanh")`, GPT-2's `gelu_new`."""
    v = x.data
    t = np.tanh(_GELU_SCALE * (v + 0.044715 * v**3))
    out = 0.5 * v * (1 + t)

    def backward(g):
        dt = (1 - t * t) * _GELU_SCALE * (1 + 3 * 0.044715 * v * v)  # d tanh(inner) / dv
        return (g * (0.5 * (1 + t) + 0.5 * v * dt),)

    return Tensor._op(out, (x,), backward, "gelu")


def layer_norm(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Normalise over the last `len(normalized_shape)` dims, then scale and shift, like `F.layer_norm`.

    The normalisation is one fused op; the affine part reuses `*` and `+`, whose backward already sums
    the weight and bias gradients over the leading dims.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.shape[x.ndim - len(shape):] != shape:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end with normalized_shape {shape}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != shape:
            raise ValueError(f"layer_norm: {name} shape {param.shape} must equal normalized_shape {shape}")
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    centered = x.data - x.data.mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + eps)  # biased variance, as torch
    xhat = centered * rstd

    def backward(g):
        mean_g = g.mean(axis=axes, keepdims=True)
        mean_gx = (g * xhat).mean(axis=axes, keepdims=True)
        return (rstd * (g - mean_g - xhat * mean_gx),)

    out = Tensor._op(xhat, (x,), backward, "layer_norm")
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def linear(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    """`x @ weight.T + bias` with torch's (out_features, in_features) weight, as one op.

    Fused so backward is three plain matmuls on 2-D views (no transposed copy, no broadcast sum),
    and skips the input gradient when the input needs none (the first layer's data).
    """
    out_features, in_features = weight.shape
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"linear: input shape {x.shape} and weight shape {weight.shape} are not aligned "
                         f"(input's last dim must be in_features={in_features})")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"linear: bias shape {bias.shape} must be ({out_features},) to match weight {weight.shape}")
    out = x.data @ weight.data.T  # (..., out)
    if bias is not None:
        out += bias.data

    def backward(g):  # g: (..., out)
        g2 = g.reshape(-1, out_features)  # (N, out)
        gx = g @ weight.data if x.requires_grad else None  # (..., in)
        gw = g2.T @ x.data.reshape(-1, in_features) if weight.requires_grad else None  # (out, in)
        gb = g2.sum(axis=0) if bias is not None and bias.requires_grad else None  # (out,)
        return gx, gw, gb

    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._op(out, parents, backward, "linear")


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of `weight` (num_embeddings, dim) picked by integer `ids` of any shape, like `F.embedding`."""
    index = ids.data if isinstance(ids, Tensor) else np.asarray(ids)
    if index.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be integers (int32/int64), got {index.dtype}")
    num_embeddings = weight.shape[0]
    if index.size and (index.min() < 0 or index.max() >= num_embeddings):
        bad = index.min() if index.min() < 0 else index.max()
        raise ValueError(f"embedding: id {bad} is out of range for {num_embeddings} embeddings "
                         f"(allowed 0..{num_embeddings - 1})")
    return weight[index]


def dropout(x: Tensor, p: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Inverted dropout, like `F.dropout`: zero each element with probability p, scale the rest by 1/(1-p).

    The scaling keeps the expected value unchanged, so evaluation (training=False) is the identity.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability p must be between 0 and 1, got {p}")
    if not training or p == 0.0:
        return x
    generator = default_generator() if generator is None else generator
    keep = generator.random(x.shape, dtype=x.dtype) >= p
    scale = keep * x.dtype.type(1 / (1 - p)) if p < 1 else np.zeros_like(x.data)
    return Tensor._op(x.data * scale, (x,), lambda g: (g * scale,), "dropout")
