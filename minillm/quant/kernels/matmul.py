"""Fused matmuls on quantized weights: NF4/FP4 dequantized tile by tile in registers, and int8 x int8.

Chapter 13 teaches this file. Both follow Triton's tiled-matmul pattern: program (i, j) owns the output tile
rows i*BLOCK_M ..., columns j*BLOCK_N ... and walks along K, BLOCK_K at a time, adding
`x_tile (BLOCK_M, BLOCK_K) @ w_tile.T (BLOCK_K, BLOCK_N)` into an fp32 (or int32) accumulator. The weight never
exists in 16 or 32 bits in memory: each program reads its packed bytes and decodes them where it needs them,
so a weight-bound matmul (small batch, the decoding case of an LLM) reads 4 bits per weight instead of 16.

    x (M, K)           W (N, K) packed           out (M, N)
    +---------+        +---------+               +---------+
    |i  ==>   |   @    |j  ==>   | .T       =    |    (i,j)|
    +---------+        +---------+               +---------+
    row tile i          row tile j of W           one program per output tile
"""

import torch
import triton
import triton.language as tl

from minillm.quant.kernels.common import (FLOAT_DTYPES, INTERPRETED, cast_to, check_devices, check_tensor,
                                          launch_options)
from minillm.quant.kernels.dequant import check_absmax, dequantize_4bit, load_absmax
from minillm.quant.nf4 import BLOCKSIZES_4BIT, QuantState

NUM_WARPS, NUM_STAGES = 4, 3  # GPU only: threads per program / 32, and K tiles loaded ahead (software pipeline)


def tile_sizes(m: int, n: int, k: int, min_k: int = 16) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for an (m, k) @ (k, n) product.

    `tl.dot` needs every side >= 16 on the GPU, and K >= 32 for int8 inputs (`min_k`). The interpreter pays per
    program, so it gets wide output tiles (up to 64 x 256); the GPU gets tiles that keep the tensor cores busy
    without spilling registers. Both step along K by at most 64: each `tl.dot` sums 64 products, and the partial
    sums are added in the accumulator. Any such order stays within the dot-product bound γ_K Σ|x·w| that chapter
    13 and tests/quant/test_kernels.py check; how it compares with F.linear's BLAS depends on the CPU.
    """
    cap_m, cap_n, cap_k = (64, 256, 64) if INTERPRETED else (64, 64, 64)
    return tuple(max(least, min(cap, triton.next_power_of_2(size)))
                 for cap, size, least in ((cap_m, m, 16), (cap_n, n, 16), (cap_k, k, min_k)))


# ----------------------------------------------------------------------------------------- NF4 / FP4
@triton.jit
def matmul_4bit_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K,
                       stride_xm, stride_xk, stride_om, stride_on,
                       nested_absmax_ptr, nested_code_ptr, offset_ptr,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """out = x @ W.T, W (N, K) packed as by quantize_4bit (flat index n*K + k, two per byte, high nibble first)."""
    m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,) rows of x
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,) rows of W
    dtype = x_ptr.dtype.element_ty
    # tl.full, not tl.zeros: see common.py on Triton-written library functions in the interpreter.
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
        x_mask = (m[:, None] < M) & (k[None, :] < K)  # (BLOCK_M, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk, mask=x_mask, other=0.0)

        # W tile, already transposed: w[kk, nn] = W[n[nn], k[kk]], flat index n*K + k.
        w_mask = (k[:, None] < K) & (n[None, :] < N)  # (BLOCK_K, BLOCK_N)
        flat = n[None, :] * K + k[:, None]  # (BLOCK_K, BLOCK_N)
        byte = tl.load(packed_ptr + flat // 2, mask=w_mask, other=0)  # uint8; neighbours share a byte
        nibble = (byte >> (4 - 4 * (flat % 2)).to(tl.uint8)) & 0xF  # even index: high nibble
        absmax = load_absmax(absmax_ptr, flat // BLOCKSIZE, w_mask, nested_absmax_ptr, nested_code_ptr,
                             offset_ptr, NESTED, NESTED_BLOCKSIZE)  # (BLOCK_K, BLOCK_N) fp32
        # Round the weight to x's dtype first, exactly as dequantize_4bit(..., x.dtype) would.
        w = cast_to(tl.load(code_ptr + nibble) * absmax, dtype, INTERPRET)  # (BLOCK_K, BLOCK_N)

        if dtype == tl.float32:
            acc = tl.dot(x, w, acc, input_precision="ieee")  # not tf32: as accurate as F.linear in fp32
        elif INTERPRET and dtype == tl.bfloat16:
            # The interpreter's bf16 dot multiplies the raw 16-bit patterns; widening is exact, and the GPU's
            # bf16 tensor cores also multiply exactly and accumulate in fp32.
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)  # fp16/bf16 tensor cores, fp32 accumulator
    out_mask = (m[:, None] < M) & (n[None, :] < N)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :] * stride_on,
             cast_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=out_mask)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """`x @ W.T` for x (..., K) and a 4-bit W (N, K) that stays packed: (..., N) in x's dtype.

    Chapter 13 teaches this. W's values are those of `minillm.quant.dequantize_4bit(packed, state, x.dtype)`
    (NF4 or FP4, with or without double quantization); products are accumulated in fp32 and rounded once to
    x's dtype: each output is within γ_K Σ|x·w| (fp32 unit roundoff) of the exact product on the dequantized weight,
    plus half an ulp of x's dtype, the bound `F.linear` on the dequantized weight also meets.
    Differentiable in x (W is frozen), as QLoRA needs: the gradient is `grad @ W`, as `F.linear`'s.
    """
    where = "kernels.matmul_4bit"
    check_tensor(where, "x", x, FLOAT_DTYPES)
    if not isinstance(state, QuantState):
        raise TypeError(f"{where}: state must be the minillm.quant.QuantState from quantize_4bit, "
                        f"got {type(state).__name__}")
    if len(state.shape) != 2:
        raise ValueError(f"{where}: the quantized weight must be 2-D (out_features, in_features), got shape "
                         f"{tuple(state.shape)}")
    N, K = state.shape
    if x.shape[-1] != K:
        raise ValueError(f"{where}: x @ W.T needs x (..., {K}) for W {tuple(state.shape)}, got x {tuple(x.shape)}")
    check_tensor(where, "packed", packed, (torch.uint8,))
    if packed.numel() != (N * K + 1) // 2:
        raise ValueError(f"{where}: W {tuple(state.shape)} packs into {(N * K + 1) // 2} bytes, got packed of "
                         f"shape {tuple(packed.shape)}; pass the pair quantize_4bit returned")
    if state.blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"{where}: state.blocksize must be one of {BLOCKSIZES_4BIT}, got {state.blocksize!r}")
    check_absmax(where, state)
    tensors = dict(x=x, packed=packed, absmax=state.absmax, code=state.code)
    if state.nested:
        tensors.update(nested_absmax=state.nested_absmax, nested_code=state.nested_code, offset=state.offset)
    check_devices(where, **tensors)
    return MatMul4bit.apply(x, packed, state)


class MatMul4bit(torch.autograd.Function):
    """The fused kernel forward; backward `grad_x = grad_out @ W` with W dequantized by our own kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
        ctx.packed, ctx.state = packed, state  # not save_for_backward: packed never needs a gradient
        return launch_matmul_4bit(x, packed, state)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = dequantize_4bit(ctx.packed, ctx.state, grad_out.dtype)  # (N, K)
        return grad_out @ weight, None, None  # (..., N) @ (N, K) -> (..., K)


def launch_matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Start `matmul_4bit_kernel` on checked inputs: one program per (BLOCK_M, BLOCK_N) tile of the output."""
    N, K = state.shape
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = tile_sizes(M, N, K)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    nested = (state.nested_absmax, state.nested_code, state.offset) if state.nested else (None, None, None)
    matmul_4bit_kernel[grid](x2, packed.reshape(-1).contiguous(), state.absmax.contiguous(),
                             state.code.contiguous(), out, M, N, K, *x2.stride(), *out.stride(), *nested,
                             BLOCKSIZE=state.blocksize, NESTED=state.nested,
                             NESTED_BLOCKSIZE=state.nested_blocksize or 1,
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INTERPRET=INTERPRETED,
                             **launch_options(NUM_WARPS, NUM_STAGES))
    return out.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------- int8
@triton.jit
def matmul_int8_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, out_ptr, M, N, K,
                       stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = (a @ b.T accumulated exactly in int32) * a_scale[:, None] * b_scale[None, :], in fp32."""
    m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
        a = tl.load(a_ptr + m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0)  # (BLOCK_M, BLOCK_K) int8
        b = tl.load(b_ptr + k[:, None] * stride_bk + n[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (n[None, :] < N), other=0)  # (BLOCK_K, BLOCK_N) int8, b.T's tile
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 tensor cores, exact int32 sums
    a_scale = tl.load(a_scale_ptr + m, mask=m < M, other=0.0)  # (BLOCK_M,)
    b_scale = tl.load(b_scale_ptr + n, mask=n < N, other=0.0)  # (BLOCK_N,)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]  # (BLOCK_M, BLOCK_N)
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :] * stride_on, out,
             mask=(m[:, None] < M) & (n[None, :] < N))


def matmul_int8(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """fp32 (M, N) `(x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :]` with exact int32 accumulation.

    Chapter 13 teaches this. x_q (M, K) and w_q (N, K) are int8; x_scale (M,) and w_scale (N,) (or (M, 1),
    (N, 1)) are fp32 steps, as `minillm.quant.absmax_quantize(t, dim=-1)` returns them (for LLM.int8()'s
    absmax, pass `absmax * (1 / 127)`). Equal to torch's exact `x_q.int() @ w_q.int().T`, scaled in this order.
    """
    where = "kernels.matmul_int8"
    check_tensor(where, "x_q", x_q, (torch.int8,), ndim=2)
    check_tensor(where, "w_q", w_q, (torch.int8,), ndim=2)
    (M, K), (N, K_w) = x_q.shape, w_q.shape
    if K != K_w:
        raise ValueError(f"{where}: x_q @ w_q.T needs x_q (M, K) and w_q (N, K), got x_q {tuple(x_q.shape)} "
                         f"and w_q {tuple(w_q.shape)}")
    for name, scale, rows in (("x_scale", x_scale, M), ("w_scale", w_scale, N)):
        check_tensor(where, name, scale, (torch.float32,))
        if scale.shape not in ((rows,), (rows, 1)):
            raise ValueError(f"{where}: {name} must hold one scale per row, shape ({rows},) or ({rows}, 1), "
                             f"got {tuple(scale.shape)}")
    if K > 2**31 // 128**2:
        raise ValueError(f"{where}: K = {K} could overflow the int32 accumulator (128 * 128 * K >= 2**31); "
                         f"split K into chunks of at most {2**31 // 128**2}")
    device = check_devices(where, x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale)

    out = torch.empty(M, N, dtype=torch.float32, device=device)
    block_m, block_n, block_k = tile_sizes(M, N, K, min_k=32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    matmul_int8_kernel[grid](x_q, x_scale.reshape(M).contiguous(), w_q, w_scale.reshape(N).contiguous(), out,
                             M, N, K, *x_q.stride(), *w_q.stride(), *out.stride(),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                             **launch_options(NUM_WARPS, NUM_STAGES))
    return out
