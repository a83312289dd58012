"""Chapter 13's checks pass right answers, flag plausible wrong ones and wait for untouched stubs.

The right and wrong answers are Triton kernels written here (a solution notebook is not importable). They run
where the package's kernels run: in the interpreter on the CPU, or compiled on a GPU.
"""

import torch

from minillm.quant import kernels  # first: sets TRITON_INTERPRET (no GPU) before the kernels below are decorated

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from minillm.exercises import ch13  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


# --- 13.1 unpack nibbles --------------------------------------------------------------------------


@triton.jit
def unpack_kernel(packed_ptr, out_ptr, m, BLOCK: tl.constexpr, SIGNED: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) byte indices
    byte = tl.load(packed_ptr + i, mask=i < m, other=0)
    if SIGNED:  # the mistake: int8 bytes, so >> 4 copies the sign bit into the high nibble
        byte = byte.to(tl.int8, bitcast=True)
    tl.store(out_ptr + 2 * i, (byte >> 4).to(tl.uint8), mask=i < m)
    tl.store(out_ptr + 2 * i + 1, (byte & 0xF).to(tl.uint8), mask=i < m)


def unpack_nibbles(packed, signed=False):
    out = torch.empty(2 * packed.numel(), dtype=torch.uint8, device=packed.device)
    block = 256
    unpack_kernel[(triton.cdiv(packed.numel(), block),)](packed, out, packed.numel(), BLOCK=block, SIGNED=signed)
    return out


def test_unpack_nibbles_check(capsys):
    passed, stubbed, wrong = run_three(ch13.check_unpack_nibbles, unpack_nibbles,
                                       lambda packed: unpack_nibbles(packed, signed=True), capsys)
    assert passed == "Exercise 13.1 (unpack nibbles in Triton): passed ✓"
    assert stubbed.startswith("Exercise 13.1 (unpack nibbles in Triton): not attempted yet")
    assert wrong.startswith("Exercise 13.1 (unpack nibbles in Triton): not yet ✗ - case 1: "
                            "unpack_nibbles_kernel(256 bytes): first mismatch at index (256,)"), (
        "byte 0x80 is the first whose sign bit is set: its high nibble 8 must be the first value flagged")


def test_unpack_nibbles_check_reports_a_wrong_dtype(capsys):
    ch13.check_unpack_nibbles(lambda packed: unpack_nibbles(packed).long())
    (line,) = outputs(capsys)
    assert "expected dtype torch.uint8, got torch.int64" in line


# --- 13.2 block absmax with a ragged tail ---------------------------------------------------------
# The notebook's answer reduces with tl.max. Here we reduce with tl.reduce and our own combine function:
# tl.max is itself a @triton.jit function (triton/language/standard.py), decorated when triton is first
# imported, and in a whole-suite run another test module may import triton (through bitsandbytes) before
# TRITON_INTERPRET is set, leaving tl.max compiled-only and unusable in the interpreter. tl.reduce is built in.


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def absmax_kernel(x_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, MASKED: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCKSIZE + tl.arange(0, BLOCKSIZE)  # (BLOCKSIZE,)
    if MASKED:
        values = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
    else:  # the mistake: the last block reads past the end of x
        values = tl.load(x_ptr + offsets)
    tl.store(out_ptr + pid, tl.reduce(tl.abs(values), 0, maximum))


def block_absmax(x, blocksize, masked=True):
    out = torch.empty(triton.cdiv(x.numel(), blocksize), dtype=torch.float32, device=x.device)
    absmax_kernel[(out.numel(),)](x, out, x.numel(), BLOCKSIZE=blocksize, MASKED=masked)
    return out


def test_block_absmax_check(capsys):
    passed, stubbed, wrong = run_three(ch13.check_block_absmax, block_absmax,
                                       lambda x, blocksize: block_absmax(x, blocksize, masked=False), capsys)
    assert passed == "Exercise 13.2 (mask the ragged tail): passed ✓"
    assert stubbed.startswith("Exercise 13.2 (mask the ragged tail): not attempted yet")
    assert wrong.startswith("Exercise 13.2 (mask the ragged tail): not yet ✗ - case 1: "
                            "block_absmax(x of 1000 values, blocksize=64): the last block's absmax is 10000, "
                            "a value from past the end of x"), "an unmasked load must be caught by the sentinel"


def test_block_absmax_check_catches_a_max_without_abs(capsys):
    @triton.jit
    def max_kernel(x_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr):
        offsets = tl.program_id(0) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
        tl.store(out_ptr + tl.program_id(0), tl.reduce(tl.load(x_ptr + offsets, mask=offsets < n, other=0.0), 0,
                                                   maximum))

    def block_max(x, blocksize):
        out = torch.empty(triton.cdiv(x.numel(), blocksize), dtype=torch.float32, device=x.device)
        max_kernel[(out.numel(),)](x, out, x.numel(), BLOCKSIZE=blocksize)
        return out

    ch13.check_block_absmax(block_max)
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 13.2 (mask the ragged tail): not yet ✗ - case 1: ") and "first mismatch" in line


# --- 13.3 NF4 dequantization, scale fused ---------------------------------------------------------


@triton.jit
def dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
                   LOW_FIRST: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) value indices
    mask = i < n
    byte = tl.load(packed_ptr + i // 2, mask=mask, other=0)
    high_half = (i % 2 == 1) if LOW_FIRST else (i % 2 == 0)  # LOW_FIRST: the mistake, the wrong nibble order
    nibble = tl.where(high_half, byte >> 4, byte & 0xF)
    absmax = tl.load(absmax_ptr + i // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + i, tl.load(code_ptr + nibble, mask=mask, other=0.0) * absmax, mask=mask)


def dequantize_nf4(packed, absmax, code, n, blocksize, low_first=False):
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    block = 1024
    dequant_kernel[(triton.cdiv(n, block),)](packed, absmax, code, out, n, BLOCKSIZE=blocksize, BLOCK=block,
                                             LOW_FIRST=low_first)
    return out


def test_dequantize_nf4_check(capsys):
    passed, stubbed, wrong = run_three(ch13.check_dequantize_nf4, dequantize_nf4,
                                       lambda *args: dequantize_nf4(*args, low_first=True), capsys)
    assert passed == "Exercise 13.3 (fuse the absmax scale into the dequantization): passed ✓"
    assert stubbed.startswith("Exercise 13.3 (fuse the absmax scale into the dequantization): not attempted yet")
    assert wrong.startswith("Exercise 13.3 (fuse the absmax scale into the dequantization): not yet ✗ - case 1: "
                            "dequantize_nf4(nf4, n=1001, blocksize=64): first mismatch at index")


def test_dequantize_nf4_check_flags_a_wrong_blocksize(capsys):
    ch13.check_dequantize_nf4(lambda packed, absmax, code, n, blocksize:
                              dequantize_nf4(packed, absmax, code, n, 2 * blocksize))  # reads absmax in bounds
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 13.3 (fuse the absmax scale into the dequantization): not yet ✗ - case 1: "
                           "dequantize_nf4(nf4, n=1001, blocksize=64): first mismatch at index (64,)"), (
        "value 64 is the first of the second block, the first one scaled by the wrong absmax")


# --- 13.4 int8 rows on a 2-D grid -----------------------------------------------------------------


@triton.jit
def rows_kernel(q_ptr, scale_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DIVIDE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    offsets = rows[:, None] * C + cols[None, :]  # (BLOCK_R, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    q = tl.load(q_ptr + offsets, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < R, other=1.0)[:, None]  # (BLOCK_R, 1)
    out = q / scale if DIVIDE else q * scale  # DIVIDE: the mistake, treating the scale as a divisor
    tl.store(out_ptr + offsets, out, mask=mask)


def dequantize_rows(q, row_scale, divide=False):
    R, C = q.shape
    out = torch.empty(R, C, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(R, 16), triton.cdiv(C, 64))
    rows_kernel[grid](q, row_scale, out, R, C, BLOCK_R=16, BLOCK_C=64, DIVIDE=divide)
    return out


def test_dequantize_rows_check(capsys):
    passed, stubbed, wrong = run_three(ch13.check_dequantize_rows, dequantize_rows,
                                       lambda q, row_scale: dequantize_rows(q, row_scale, divide=True), capsys)
    assert passed == "Exercise 13.4 (a 2-D grid: int8 rows): passed ✓"
    assert stubbed.startswith("Exercise 13.4 (a 2-D grid: int8 rows): not attempted yet")
    assert wrong.startswith("Exercise 13.4 (a 2-D grid: int8 rows): not yet ✗ - case 1: "
                            "dequantize_rows(q of shape (5, 37)): first mismatch at index")
