"""Dequantization kernels: NF4/FP4 (two codes per byte, a 16-entry table, one absmax per block) and int8 rows.

Chapter 13 teaches this file. Both are pure streaming kernels: each program reads a contiguous BLOCK of input
and writes the matching block of output, so their speed is set by memory bandwidth, and the work per byte
(a shift, a mask, a table lookup, a multiply) is free as long as it stays in registers.
"""

import math

import torch
import triton
import triton.language as tl

from minillm.quant.kernels.common import (INTERPRETED, cast_to, check_devices, check_out_dtype, check_tensor,
                                          launch_options)
from minillm.quant.nf4 import BLOCKSIZES_4BIT, QuantState

# Bytes per program. The interpreter spends ~1-2 ms per program however small, so it gets few, huge blocks;
# on the GPU a block is what one program streams through its registers (tuned in benchmarks/kernels_gpu.py).
BLOCK_4BIT = 2**16 if INTERPRETED else 1024
BLOCK_INT8 = (64, 1024) if INTERPRETED else (8, 1024)  # (rows, columns) per program
NUM_WARPS = 4  # GPU threads per program / 32


# ------------------------------------------------------------------------------------------ NF4 / FP4
@triton.jit
def load_absmax(absmax_ptr, block, mask, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of each 4-bit block index in `block` (any shape), undoing double quantization if NESTED.

    With NESTED, absmax holds uint8 codes of `absmax - offset` in the dynamic map `nested_code`, one fp32
    scale per NESTED_BLOCKSIZE of them: `nested_code[c] * nested_absmax[block // NESTED_BLOCKSIZE] + offset`,
    rounded twice, as bitsandbytes' `dequantize_blockwise` followed by `+= offset` does.
    """
    if NESTED:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0)  # uint8
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + absmax_code) * scale  # rounded to fp32 here ...
        return absmax + tl.load(offset_ptr)  # ... and again here (no fused multiply-add: see launch_options)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n,
                           nested_absmax_ptr, nested_code_ptr, offset_ptr,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                           BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """out[i] = code[nibble i] * absmax[i // BLOCKSIZE] for the n values packed two per byte, high nibble first.

    Program p decodes bytes p*BLOCK ... p*BLOCK + BLOCK - 1 into values 2*p*BLOCK ... 2*(p+1)*BLOCK - 1.
    NESTED (double quantization) decodes the absmax in the same pass (`load_absmax`).
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: p * BLOCK overflows int32 past 2**31 bytes
    byte = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    in_range = byte < (n + 1) // 2  # the last program's block runs past the end: mask every load
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0)  # (BLOCK,) uint8
    high = packed >> 4  # uint8, so a logical shift (an int8 would drag the sign bit in)
    low = packed & 0xF

    # BLOCKSIZE is even, so both values of a byte share one block: one absmax per byte.
    absmax = load_absmax(absmax_ptr, byte // (BLOCKSIZE // 2), in_range, nested_absmax_ptr, nested_code_ptr,
                         offset_ptr, NESTED, NESTED_BLOCKSIZE)  # (BLOCK,) fp32

    first = tl.load(code_ptr + high) * absmax  # (BLOCK,) fp32, values 2j
    second = tl.load(code_ptr + low) * absmax  # (BLOCK,) fp32, values 2j + 1
    # (BLOCK, 2) -> (2 * BLOCK,) row by row: first[0], second[0], first[1], ... This is what tl.interleave
    # does, but tl.interleave is written in Triton (see common.py for why that matters); join and reshape
    # are built in.
    values = tl.reshape(tl.join(first, second), (2 * BLOCK,))
    index = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)  # (2 * BLOCK,)
    # index < n also drops the padding nibble of an odd count.
    tl.store(out_ptr + index, cast_to(values, out_ptr.dtype.element_ty, INTERPRET), mask=index < n)


def check_absmax(where: str, state: QuantState) -> None:
    """The kernels read absmax[i // blocksize] (and nested_absmax[block // nested_blocksize]) unchecked: a
    short one would be read past its end, giving garbage instead of an error."""
    n = math.prod(state.shape)
    num_blocks = -(-n // state.blocksize)
    absmax_dtype = torch.uint8 if state.nested else torch.float32
    if state.absmax.dtype != absmax_dtype or state.absmax.shape != (num_blocks,):
        raise ValueError(f"{where}: {n} values in blocks of {state.blocksize} need a ({num_blocks},) "
                         f"{absmax_dtype} absmax, got {state.absmax.dtype} {tuple(state.absmax.shape)}")
    if state.nested:
        num_nested = -(-num_blocks // state.nested_blocksize)
        if state.nested_absmax.dtype != torch.float32 or state.nested_absmax.shape != (num_nested,):
            raise ValueError(f"{where}: {num_blocks} absmax codes in blocks of {state.nested_blocksize} need a "
                             f"({num_nested},) torch.float32 nested_absmax, got {state.nested_absmax.dtype} "
                             f"{tuple(state.nested_absmax.shape)}")


def dequantize_4bit(packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `minillm.quant.dequantize_4bit`: a tensor of `state.shape` in `out_dtype`.

    Chapter 13 teaches this. `out_dtype` defaults to `state.dtype`. `out`, if given, is a contiguous tensor of
    `state.shape` and `out_dtype` to write into (as bitsandbytes' `out=`); chapter 13's check passes one with
    guard regions around it, to catch a kernel that writes past its end. Equal (`torch.equal`) to
    `minillm.quant.dequantize_4bit(packed, state, out_dtype)` and to bitsandbytes' `dequantize_4bit` on its
    correct path, for NF4 and FP4, with and without double quantization, in fp32, fp16 and bf16.
    """
    where = "kernels.dequantize_4bit"
    if not isinstance(state, QuantState):
        raise TypeError(f"{where}: state must be the minillm.quant.QuantState from quantize_4bit, "
                        f"got {type(state).__name__}")
    check_tensor(where, "packed", packed, (torch.uint8,))
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{where}: a tensor of shape {tuple(state.shape)} packs into {(n + 1) // 2} bytes, "
                         f"got packed of shape {tuple(packed.shape)}; pass the pair quantize_4bit returned")
    if state.blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"{where}: state.blocksize must be one of {BLOCKSIZES_4BIT}, got {state.blocksize!r}")
    out_dtype = state.dtype if out_dtype is None else out_dtype
    check_out_dtype(where, out_dtype)
    check_absmax(where, state)
    nested = (state.nested_absmax, state.nested_code, state.offset) if state.nested else (None, None, None)
    tensors = dict(packed=packed, absmax=state.absmax, code=state.code)
    if state.nested:
        tensors.update(nested_absmax=state.nested_absmax, nested_code=state.nested_code, offset=state.offset)
    device = check_devices(where, **tensors)

    packed = packed.reshape(-1).contiguous()  # (n_bytes,)
    if out is None:
        out = torch.empty(state.shape, dtype=out_dtype, device=device)
    elif not (isinstance(out, torch.Tensor) and out.shape == state.shape and out.dtype == out_dtype
              and out.device == device and out.is_contiguous()):
        raise ValueError(f"{where}: out must be a contiguous {out_dtype} tensor of shape {tuple(state.shape)} on "
                         f"{device}, got {out.dtype if isinstance(out, torch.Tensor) else type(out).__name__} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    block = min(BLOCK_4BIT, triton.next_power_of_2(packed.numel()))  # small tensors: one short program
    grid = (triton.cdiv(packed.numel(), block),)
    dequantize_4bit_kernel[grid](packed, state.absmax.contiguous(), state.code.contiguous(), out, n, *nested,
                                 BLOCKSIZE=state.blocksize, NESTED=state.nested,
                                 NESTED_BLOCKSIZE=state.nested_blocksize or 1, BLOCK=block,
                                 INTERPRET=INTERPRETED, **launch_options(NUM_WARPS))
    return out


# ------------------------------------------------------------------------------------------------ int8
@triton.jit
def dequantize_int8_kernel(q_ptr, scale_ptr, out_ptr, rows, cols, stride_qr, stride_qc, stride_or, stride_oc,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """out[r, c] = q[r, c] * scale[r] for one (BLOCK_R, BLOCK_C) tile per program, in fp32, rounded once."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (BLOCK_R,)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)  # (BLOCK_C,)
    mask = (r[:, None] < rows) & (c[None, :] < cols)  # (BLOCK_R, BLOCK_C)
    q = tl.load(q_ptr + r[:, None] * stride_qr + c[None, :] * stride_qc, mask=mask, other=0)  # int8
    scale = tl.load(scale_ptr + r, mask=r < rows, other=0.0)  # (BLOCK_R,) fp32
    values = q.to(tl.float32) * scale[:, None]  # (BLOCK_R, BLOCK_C)
    tl.store(out_ptr + r[:, None] * stride_or + c[None, :] * stride_oc,
             cast_to(values, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def dequantize_int8(q: torch.Tensor, row_scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(rows, cols) `q * row_scale[:, None]`, computed in fp32 and rounded once to `out_dtype`.

    Chapter 13 teaches this. `row_scale` is the step of each row, (rows,) or (rows, 1) fp32: what
    `minillm.quant.absmax_quantize(w, dim=-1)` returns, or `row_absmax * (1 / 127)` for LLM.int8()'s
    absmax (then the result equals `Int8Linear.dequantized_weight`, bitsandbytes' train-mode weight).
    """
    where = "kernels.dequantize_int8"
    check_tensor(where, "q", q, (torch.int8,), ndim=2)
    check_tensor(where, "row_scale", row_scale, (torch.float32,))
    rows, cols = q.shape
    if row_scale.shape not in ((rows,), (rows, 1)):
        raise ValueError(f"{where}: q of shape {tuple(q.shape)} needs one scale per row, row_scale of shape "
                         f"({rows},) or ({rows}, 1), got {tuple(row_scale.shape)}")
    check_out_dtype(where, out_dtype)
    device = check_devices(where, q=q, row_scale=row_scale)

    out = torch.empty(rows, cols, dtype=out_dtype, device=device)
    block_r = min(BLOCK_INT8[0], triton.next_power_of_2(rows))
    block_c = min(BLOCK_INT8[1], triton.next_power_of_2(cols))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    dequantize_int8_kernel[grid](q, row_scale.reshape(rows).contiguous(), out, rows, cols, *q.stride(),
                                 *out.stride(), BLOCK_R=block_r, BLOCK_C=block_c, INTERPRET=INTERPRETED,
                                 **launch_options(NUM_WARPS))
    return out
