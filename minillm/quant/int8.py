"""int8 quantization: absmax and zero-point, LLM.int8()'s vector-wise quantization and outlier decomposition.

Chapter 11 teaches this module, in building order:

1. `absmax_quantize` / `zeropoint_quantize`: the two textbook schemes, per tensor or per row, checked against
   torch's `fake_quantize_per_tensor_affine` / `fake_quantize_per_channel_affine`.
2. `int8_vectorwise_quant`, `int8_linear_matmul`, `int8_mm_dequant`: LLM.int8()'s building blocks (one scale
   per row of the activations and per row of the weight, an int8 matmul with int32 accumulation), equal to
   the bitsandbytes functions of the same names on CPU.
3. `Int8Linear`: LLM.int8() (Dettmers et al., 2022) as a drop-in for `nn.Linear`. Activation columns with a
   value of magnitude >= threshold (the "outlier features") are multiplied in 16-bit; everything else in
   int8. Its outputs are `torch.equal` to `bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False)` in eval and
   in train mode for fp32, fp16 and bf16 inputs, on every CPU while in_features <= 1040 (see
   `int8_linear_matmul`: past that, bitsandbytes' fallback for CPUs without AVX512 may round its sums).

Conventions: absmax_quantize and zeropoint_quantize return the *step* `scale` (dequantize = codes * scale);
the LLM.int8() functions return each row's *absmax*, as bitsandbytes does (dequantize = codes * absmax / 127).
"""

import torch
import torch.nn.functional as F
from torch import nn

from minillm.quant.blockwise import _check_float_tensor

# 1 / 127**2 = 6.2000124e-05, but bitsandbytes' CPU/default int8_mm_dequant writes 6.200124e-05 (a zero lost;
# its CUDA kernel has the right value). The product is 1.8e-5 too large, relatively. We copy the constant
# because the outputs must be equal to bitsandbytes', and say so here so nobody mistakes it for 1 / 127**2.
BNB_INV_127_SQUARED = 6.200124e-05

_TINY = torch.finfo(torch.float32).tiny  # a floor for scales, so an all-zero tensor never divides by zero


# ------------------------------------------------------------------------------ absmax and zero-point
def absmax_quantize(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: codes = round(x / scale) in -127..127, with scale = absmax / 127.

    Chapter 11 teaches this. `dim=None` uses one absmax for the whole tensor (scale is 0-d); `dim=d` reduces
    over dimension d, so `dim=-1` gives one scale per row (scale keeps d with size 1, so it broadcasts).
    Returns (int8 codes shaped like x, fp32 scale). Equal, after `absmax_dequantize`, to
    `torch.fake_quantize_per_tensor_affine(x, scale, 0, -127, 127)` (per channel for `dim`).
    """
    x = _as_fp32("absmax_quantize", x, dim)
    absmax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)  # () or (..., 1, ...)
    scale = (absmax / 127).clamp(min=_TINY)
    # Multiplying by the reciprocal, as torch's fake_quantize does, keeps the codes equal to torch's.
    codes = torch.round(x * (1 / scale))  # ties to even
    return codes.to(torch.int8), scale


def absmax_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 approximation of the x given to `absmax_quantize`: codes * scale. Chapter 11 teaches this."""
    _check_codes("absmax_dequantize", codes, torch.int8)
    return codes.float() * scale


def zeropoint_quantize(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int8: the range [min, max] is mapped onto -128..127 through a step and a zero point.

    Chapter 11 teaches this. scale = (max - min) / 255 and zero_point = round(-min / scale) - 128, so min maps
    to -128 and max to 127; codes = clamp(round(x / scale) + zero_point, -128, 127). The range is widened to
    include 0 so that 0 (padding, a ReLU's output) is exactly representable, as torch's observers do.
    `dim` works as in `absmax_quantize`. Returns (int8 codes, fp32 scale, int32 zero_point). Equal, after
    `zeropoint_dequantize`, to `torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)`.
    """
    x = _as_fp32("zeropoint_quantize", x, dim)
    if dim is None:
        low, high = x.amin().clamp(max=0), x.amax().clamp(min=0)  # (), ()
    else:
        low, high = x.amin(dim=dim, keepdim=True).clamp(max=0), x.amax(dim=dim, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=_TINY)
    zero_point = torch.round(-low / scale).to(torch.int32) - 128
    codes = (torch.round(x * (1 / scale)) + zero_point).clamp(-128, 127)
    return codes.to(torch.int8), scale, zero_point


def zeropoint_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """fp32 approximation of the x given to `zeropoint_quantize`: (codes - zero_point) * scale. Chapter 11."""
    _check_codes("zeropoint_dequantize", codes, torch.int8)
    return (codes.to(torch.int32) - zero_point) * scale


# ----------------------------------------------------------------------------------- LLM.int8() parts
def int8_vectorwise_quant(x: torch.Tensor,
                          threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 of a 2-D x, optionally setting aside outlier columns. Chapter 11 teaches this.

    Returns (codes (rows, cols) int8, row_absmax (rows,) fp32, outlier_cols (n_outliers,) int64), equal to
    `bitsandbytes.functional.int8_vectorwise_quant(x, threshold)`, except that bitsandbytes returns None for
    the outlier columns when threshold is 0 and we return an empty tensor.

    With threshold > 0, every value with |value| >= threshold is an outlier and every column holding one is
    an outlier column. The outliers themselves are left out of their row's absmax (so one huge value does not
    flatten the rest of its row), and the codes of whole outlier columns are 0: `Int8Linear` multiplies those
    columns in 16-bit instead. Note the order, which is bitsandbytes': the *ordinary* values of an outlier
    column still count towards their row's absmax.

    An all-zero row gets absmax 0 and codes 0 (bitsandbytes computes 0 * 127/0 = NaN and casts it to 0).
    """
    _check_float_tensor("int8_vectorwise_quant", x)
    if x.dim() != 2:
        raise ValueError(f"int8_vectorwise_quant: x must be 2-D (rows, cols), got shape {tuple(x.shape)}; "
                         "reshape to (-1, x.shape[-1]) first")
    _check_threshold("int8_vectorwise_quant", threshold)
    if threshold > 0:
        outliers = x.abs() >= threshold  # (rows, cols)
        outlier_cols = outliers.any(dim=0).nonzero().view(-1)  # (n_outliers,)
        x = x.masked_fill(outliers, 0)  # a copy: the outliers must not set their row's absmax
    else:
        outlier_cols = torch.empty(0, dtype=torch.int64, device=x.device)

    row_absmax = x.abs().amax(dim=1).float()  # (rows,)
    row_scale = torch.where(row_absmax > 0, 127.0 / row_absmax, 0.0)  # (rows,)
    codes = torch.round(x * row_scale[:, None]).to(torch.int8)  # (rows, cols), ties to even
    codes[:, outlier_cols] = 0
    return codes, row_absmax, outlier_cols


def int8_vectorwise_dequant(codes: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """fp32 (rows, cols): codes * row_absmax / 127, as `bitsandbytes.functional.int8_vectorwise_dequant`.

    Chapter 11 teaches this. bitsandbytes multiplies by the absmax first and by 1/127 second; the order
    matters in fp32's last bit, and `Int8Linear` needs this exact order for its outlier columns.
    """
    _check_codes("int8_vectorwise_dequant", codes, torch.int8)
    return codes * row_absmax.view(-1, 1) * (1 / 127)


def int8_linear_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for int8 a (M, K) and b (N, K), accumulated exactly in int32: (M, N) int32.

    Chapter 11 teaches this. Equal to `bitsandbytes.functional.int8_linear_matmul` (on CPUs with AVX512 it
    calls `torch._int_mm`; without, an fp32 matmul cast to int32). The fp32 matmul is exact, in any summation
    order, when sum_k |a_k * b_k| <= 2**24 for every output, since every partial sum is then an integer fp32
    holds; K * 127**2 <= 2**24 guarantees it, i.e. K <= 1040. Each product is at most 127 * 127, so int32
    cannot overflow for K below 2**31 / 127**2, about 133 000.
    """
    _check_codes("int8_linear_matmul: a", a, torch.int8, ndim=2)
    _check_codes("int8_linear_matmul: b", b, torch.int8, ndim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"int8_linear_matmul: a @ b.T needs a (M, K) and b (N, K), got a {tuple(a.shape)} "
                         f"and b {tuple(b.shape)}")
    return a.to(torch.int32) @ b.to(torch.int32).t()  # (M, N)


def int8_mm_dequant(acc: torch.Tensor, row_absmax: torch.Tensor, col_absmax: torch.Tensor,
                    bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Scale an int32 (M, N) product of row-quantized a and b back to real numbers: (M, N) in `dtype`.

    Chapter 11 teaches this. a ~ codes_a * row_absmax / 127 and b ~ codes_b * col_absmax / 127, so
    a @ b.T ~ acc * row_absmax ⊗ col_absmax / 127**2. Computed in fp32, bias added, rounded once to `dtype`.
    Equal to bitsandbytes' `int8_mm_dequant` (whose public wrapper always returns fp16; `dtype` is the
    argument of the op underneath), including its constant `BNB_INV_127_SQUARED`.
    """
    if not isinstance(acc, torch.Tensor) or acc.dtype != torch.int32 or acc.dim() != 2:
        raise TypeError(f"int8_mm_dequant: acc must be a 2-D torch.int32 tensor from int8_linear_matmul, "
                        f"got {acc.dtype if isinstance(acc, torch.Tensor) else type(acc).__name__}")
    if row_absmax.shape != (acc.shape[0],) or col_absmax.shape != (acc.shape[1],):
        raise ValueError(f"int8_mm_dequant: acc {tuple(acc.shape)} needs row_absmax ({acc.shape[0]},) and "
                         f"col_absmax ({acc.shape[1]},), got {tuple(row_absmax.shape)} and {tuple(col_absmax.shape)}")
    if bias is not None and bias.shape != (acc.shape[1],):
        raise ValueError(f"int8_mm_dequant: acc {tuple(acc.shape)} needs a bias of shape ({acc.shape[1]},), "
                         f"got {tuple(bias.shape)}")
    out = acc * (row_absmax[:, None] * col_absmax[None, :]) * BNB_INV_127_SQUARED  # (M, N) fp32
    if bias is not None:
        out = out + bias  # still fp32: bias is added before the single rounding to dtype
    return out.to(dtype)


def llm_int8_linear(x: torch.Tensor, weight_codes: torch.Tensor, weight_absmax: torch.Tensor,
                    bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """LLM.int8()'s forward, y = x @ W.T + bias for a 2-D x (N, in): (N, out) in x's dtype.

    Chapter 11 builds this (exercise 11.1); `Int8Linear`'s eval mode calls it. The same arithmetic, in the same
    order, as bitsandbytes' `MatMul8bitLt` on CPU: x is cast to fp16 and quantized row-wise with its outlier
    columns (a value with |value| >= threshold) set aside; the int8 codes are multiplied with int32
    accumulation and scaled back in fp32 (bias added before the one rounding to x's dtype); the outlier
    columns of x, in x's own dtype, are multiplied by the dequantized weight columns and added by `addmm`.
    `weight_codes` (out, in) int8 and `weight_absmax` (out,) fp32 come from `int8_vectorwise_quant` of the
    fp16 weight; `bias` is None or (out,) in x's dtype; threshold 0 means no outlier columns.
    """
    x_codes, x_absmax, outlier_cols = int8_vectorwise_quant(x.to(torch.float16), threshold)
    acc = int8_linear_matmul(x_codes, weight_codes)  # (N, out) int32, exact
    y = int8_mm_dequant(acc, x_absmax, weight_absmax, bias, dtype=x.dtype)  # (N, out)
    if outlier_cols.numel() > 0:
        w_outliers = int8_vectorwise_dequant(weight_codes[:, outlier_cols], weight_absmax)  # (out, n_out) fp32
        y = y.addmm(x[:, outlier_cols], w_outliers.to(x.dtype).t())  # += (N, n_out) @ (n_out, out)
    return y


# ------------------------------------------------------------------------------------------ module
class Int8Linear(nn.Module):
    """LLM.int8() linear layer: int8 weight with one absmax per output row, outlier decomposition.

    Chapter 11 teaches this. Build it with `Int8Linear.from_linear(linear, threshold=6.0)`. Outputs are
    `torch.equal` to `bitsandbytes.nn.Linear8bitLt(..., has_fp16_weights=False, threshold=threshold)` moved
    to the CPU (on every CPU while in_features <= 1040, see `int8_linear_matmul`), which takes two different
    paths on CPU that we both reproduce:

    - eval mode (`MatMul8bitLt`): `llm_int8_linear`, the outlier decomposition. Threshold 0 means no
      outlier columns.
    - train mode (`MatMul8bitFp`, the default right after construction, like every nn.Module): the weight is
      dequantized to x's dtype and `F.linear` runs; the threshold is ignored and x is not quantized.

    bitsandbytes casts its layer's bias to the input's dtype *in place* on every forward; we cast a copy.
    """

    def __init__(self, weight_codes: torch.Tensor, weight_absmax: torch.Tensor, bias: torch.Tensor | None = None,
                 threshold: float = 6.0):
        super().__init__()
        _check_codes("Int8Linear: weight_codes", weight_codes, torch.int8, ndim=2)
        if weight_absmax.shape != (weight_codes.shape[0],) or weight_absmax.dtype != torch.float32:
            raise ValueError(f"Int8Linear: weight_absmax must be fp32 of shape ({weight_codes.shape[0]},), one "
                             f"per output row, got {weight_absmax.dtype} {tuple(weight_absmax.shape)}")
        _check_threshold("Int8Linear", threshold)
        self.register_buffer("weight_codes", weight_codes)  # (out_features, in_features) int8
        self.register_buffer("weight_absmax", weight_absmax)  # (out_features,) fp32
        self.bias = None if bias is None else nn.Parameter(bias)
        self.threshold = float(threshold)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Int8Linear":
        """Quantize an `nn.Linear`: its weight, cast to fp16 as bitsandbytes does, row by row to int8."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()  # (out_features, in_features)
        codes, absmax, _ = int8_vectorwise_quant(weight.to(torch.float16))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes, absmax, bias, threshold)

    @property
    def in_features(self) -> int:
        return self.weight_codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_codes.shape[0]

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out_features, in_features) weight in `dtype`, rounded as bitsandbytes' train path does.

        The step absmax / 127 is formed first and the codes multiplied by it, in fp32, then rounded to `dtype`;
        `int8_vectorwise_dequant` (the eval path's order) differs from this in fp32's last bit.
        """
        step = self.weight_absmax * (1 / 127)  # (out_features,)
        return (self.weight_codes.float() * step[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_tensor("Int8Linear", x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: input of shape {tuple(x.shape)} does not fit weight "
                             f"({self.out_features}, {self.in_features}); the last dimension must be "
                             f"{self.in_features}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.training:
            return F.linear(x, self.dequantized_weight(x.dtype), bias)

        x2 = x.reshape(-1, self.in_features)  # (N, in)
        # Looked up in this module at call time: chapter 11's exercise swaps in the learner's version.
        y = llm_int8_linear(x2, self.weight_codes, self.weight_absmax, bias, self.threshold)  # (N, out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


# ------------------------------------------------------------------------------------------ checks
def _as_fp32(where: str, x, dim) -> torch.Tensor:
    _check_float_tensor(where, x)
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim()):
        raise ValueError(f"{where}: dim must be None (one scale for the whole tensor) or an int in "
                         f"[{-x.dim()}, {x.dim()}) for a tensor of shape {tuple(x.shape)}, got {dim!r}")
    return x.float()  # fp16 and bf16 widen exactly


def _check_codes(where: str, codes, dtype: torch.dtype, ndim: int | None = None) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != dtype:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{where}: expected a {dtype} tensor of codes, got {got}")
    if ndim is not None and codes.dim() != ndim:
        raise ValueError(f"{where}: expected a {ndim}-D tensor, got shape {tuple(codes.shape)}")


def _check_threshold(where: str, threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"{where}: threshold must be a number >= 0 (0 turns the outlier decomposition off), "
                         f"got {threshold!r}")
