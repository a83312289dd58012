"""Chapter 13's checks pass right answers, flag plausible wrong ones and wait for untouched stubs.

The right and wrong answers are Triton kernels written here (a solution notebook is not importable). They run
where the package's kernels run: in the interpreter on the CPU, or compiled on a GPU. Kernels that forget a
store mask really write out of bounds: the checks must catch that in their guard regions instead of letting it
corrupt the process (with an ordinary allocation it kills the Jupyter kernel, issue 17).
"""

import pytest
import torch

from minillm.quant import kernels  # first: sets TRITON_INTERPRET (no GPU) before the kernels below are decorated

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from minillm.exercises import ch13, use  # noqa: E402
from minillm.quant.kernels import dequant  # noqa: E402
from minillm.quant.kernels.common import cast_to  # noqa: E402
from exercise_helpers import outputs, run_three  # noqa: E402


# --- 13.1 (build) the 4-bit dequantization kernel ---------------------------------------------------
# One lane per value (the package's kernel uses one lane per byte): a different layout, the same arithmetic.
# MISTAKE picks a plausible wrong answer: 1 forgets the store mask, 2 forgets the double-quant offset,
# 3 takes the low nibble first.


@triton.jit
def dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                   BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                   BLOCK: tl.constexpr, INTERPRET: tl.constexpr, MISTAKE: tl.constexpr = 0):
    i = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)  # (2 * BLOCK,) value indices
    live = i < n
    byte = tl.load(packed_ptr + i // 2, mask=live, other=0)  # uint8
    high_first = (i % 2 == 1) if MISTAKE == 3 else (i % 2 == 0)
    nibble = tl.where(high_first, byte >> 4, byte & 0xF)
    block = i // BLOCKSIZE
    if NESTED:
        absmax_code = tl.load(absmax_ptr + block, mask=live, other=0)
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=live, other=0.0)
        absmax = tl.load(nested_code_ptr + absmax_code, mask=live, other=0.0) * scale
        if MISTAKE != 2:
            absmax = absmax + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=live, other=0.0)
    value = cast_to(tl.load(code_ptr + nibble, mask=live, other=0.0) * absmax, out_ptr.dtype.element_ty, INTERPRET)
    if MISTAKE == 1:
        tl.store(out_ptr + i, value)
    else:
        tl.store(out_ptr + i, value, mask=live)


@triton.jit
def stub_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
                INTERPRET: tl.constexpr):
    raise NotImplementedError  # the notebook's untouched stub


def with_mistake(mistake):
    """The kernel with MISTAKE fixed, as a launcher (which passes no MISTAKE) would start it."""
    class Fixed:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: dequant_kernel[grid](*args, **kwargs, MISTAKE=mistake)

        def __call__(self, *args, **kwargs):  # use() wants a callable, as a @triton.jit kernel is
            raise TypeError("a kernel is launched as kernel[grid](...)")
    return Fixed()


def test_dequantize_4bit_kernel_check(capsys):
    ch13.check_dequantize_4bit_kernel(dequant_kernel)
    ch13.check_dequantize_4bit_kernel(stub_kernel)
    ch13.check_dequantize_4bit_kernel(with_mistake(2))
    passed, stubbed, wrong = outputs(capsys)
    assert passed == "Exercise 13.1 (the 4-bit dequantization kernel): passed ✓"
    assert stubbed.startswith("Exercise 13.1 (the 4-bit dequantization kernel): not attempted yet")
    assert wrong.startswith("Exercise 13.1 (the 4-bit dequantization kernel): not yet ✗ - case 4: nf4 with double "
                            "quantization, shape (64, 256), float32, blocksize 64: first mismatch at index (0, 0)")


def test_dequantize_4bit_kernel_check_survives_a_forgotten_store_mask(capsys):
    # The issue-17 hole: without a store mask the last program writes past the output. Case 2 (1001 values,
    # 501 bytes, one program of BLOCK = 512 bytes) writes 23 values past the end, into the guard.
    ch13.check_dequantize_4bit_kernel(with_mistake(1))
    (line,) = outputs(capsys)
    assert line == ("Exercise 13.1 (the 4-bit dequantization kernel): not yet ✗ - case 2: nf4, shape (1001,), "
                    "float32, blocksize 64: your kernel wrote outside its output (23 values past its end); a lane "
                    "whose index is past the end must not store: mask the store")


def test_dequantize_4bit_kernel_check_flags_the_nibble_order_and_a_non_kernel(capsys):
    ch13.check_dequantize_4bit_kernel(with_mistake(3))
    ch13.check_dequantize_4bit_kernel(None)
    low_first, none = outputs(capsys)
    assert low_first.startswith("Exercise 13.1 (the 4-bit dequantization kernel): not yet ✗ - case 1: ")
    assert "first mismatch at index (0, 0)" in low_first
    assert none == ("Exercise 13.1 (the 4-bit dequantization kernel): not yet ✗ - case 1: expected a @triton.jit "
                    "kernel, got NoneType")


def reference_logits():
    """The chapter's reference output: the shipped model in NF4 through the torch path."""
    from minillm.pretrained import load_pretrained
    from minillm.quant import quantize_model

    model = quantize_model(load_pretrained()[0], "nf4", compress_statistics=True)
    with torch.no_grad():
        return model(torch.arange(40)[None])


def test_dequantize_4bit_kernel_plugged_in(capsys):
    before = reference_logits()
    with use(dequantize_4bit_kernel=dequant_kernel):
        assert dequant.dequantize_4bit_kernel is dequant_kernel
        assert ch13.end_to_end_dequantize_kernel()
    with use(dequantize_4bit_kernel=with_mistake(2)):
        assert not ch13.end_to_end_dequantize_kernel()
    with use(dequantize_4bit_kernel=stub_kernel):
        ch13.end_to_end_dequantize_kernel()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ch13.CLAIM_13 + ": ✓"
    assert lines[1] == (ch13.CLAIM_13 + ": ✗ - nf4 + double quantization in float32: the weight of "
                        "transformer.h.0.attn.c_attn differs first")
    assert lines[2].startswith("plug-in skipped: your dequantize_4bit_kernel (exercise 13.1) is not written yet")
    assert dequant.dequantize_4bit_kernel is original_kernel
    assert torch.equal(reference_logits(), before)


def test_dequantize_4bit_kernel_plug_in_restores_on_error():
    with pytest.raises(RuntimeError):
        with use(dequantize_4bit_kernel=dequant_kernel):
            raise RuntimeError("a learner's cell failed")
    assert dequant.dequantize_4bit_kernel is original_kernel


original_kernel = dequant.dequantize_4bit_kernel


# --- 13.2 unpack nibbles --------------------------------------------------------------------------


@triton.jit
def unpack_kernel(packed_ptr, out_ptr, m, BLOCK: tl.constexpr, SIGNED: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) byte indices
    byte = tl.load(packed_ptr + i, mask=i < m, other=0)
    if SIGNED:  # the mistake: int8 bytes, so >> 4 copies the sign bit into the high nibble
        byte = byte.to(tl.int8, bitcast=True)
    tl.store(out_ptr + 2 * i, (byte >> 4).to(tl.uint8), mask=i < m)
    tl.store(out_ptr + 2 * i + 1, (byte & 0xF).to(tl.uint8), mask=i < m)


def unpack_nibbles(packed, out, signed=False):
    block = 256
    unpack_kernel[(triton.cdiv(packed.numel(), block),)](packed, out, packed.numel(), BLOCK=block, SIGNED=signed)


def test_unpack_nibbles_check(capsys):
    passed, stubbed, wrong = run_three(ch13.check_unpack_nibbles, unpack_nibbles,
                                       lambda packed, out: unpack_nibbles(packed, out, signed=True), capsys)
    assert passed == "Exercise 13.2 (unpack nibbles in Triton): passed ✓"
    assert stubbed.startswith("Exercise 13.2 (unpack nibbles in Triton): not attempted yet")
    assert wrong.startswith("Exercise 13.2 (unpack nibbles in Triton): not yet ✗ - case 1: "
                            "unpack_nibbles_kernel(256 bytes): first mismatch at index (256,)"), (
        "byte 0x80 is the first whose sign bit is set: its high nibble 8 must be the first value flagged")


def test_unpack_nibbles_check_catches_a_forgotten_store_mask(capsys):
    @triton.jit
    def unmasked_kernel(packed_ptr, out_ptr, m, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        byte = tl.load(packed_ptr + i, mask=i < m, other=0)
        tl.store(out_ptr + 2 * i, byte >> 4)
        tl.store(out_ptr + 2 * i + 1, byte & 0xF)

    def unpack_unmasked(packed, out):
        unmasked_kernel[(triton.cdiv(packed.numel(), 256),)](packed, out, packed.numel(), BLOCK=256)

    ch13.check_unpack_nibbles(unpack_unmasked)
    (line,) = outputs(capsys)
    assert line == ("Exercise 13.2 (unpack nibbles in Triton): not yet ✗ - case 2: unpack_nibbles_kernel(37 bytes): "
                    "your kernel wrote outside its output (438 values past its end); a lane whose index is past the "
                    "end must not store: mask the store")


# --- 13.3 block absmax with a ragged tail ---------------------------------------------------------
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
    assert passed == "Exercise 13.3 (mask the ragged tail): passed ✓"
    assert stubbed.startswith("Exercise 13.3 (mask the ragged tail): not attempted yet")
    assert wrong.startswith("Exercise 13.3 (mask the ragged tail): not yet ✗ - case 1: "
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
    assert line.startswith("Exercise 13.3 (mask the ragged tail): not yet ✗ - case 1: ") and "first mismatch" in line


# --- 13.4 int8 rows on a 2-D grid -----------------------------------------------------------------


@triton.jit
def rows_kernel(q_ptr, scale_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, DIVIDE: tl.constexpr,
                COLUMN_MASK: tl.constexpr = True):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    offsets = rows[:, None] * C + cols[None, :]  # (BLOCK_R, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C) if COLUMN_MASK else (rows[:, None] < R) & (cols[None, :] >= 0)
    q = tl.load(q_ptr + offsets, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < R, other=1.0)[:, None]  # (BLOCK_R, 1)
    out = q / scale if DIVIDE else q * scale  # DIVIDE: the mistake, treating the scale as a divisor
    tl.store(out_ptr + offsets, out, mask=mask)


def dequantize_rows(q, row_scale, out, divide=False, column_mask=True):
    R, C = q.shape
    grid = (triton.cdiv(R, 16), triton.cdiv(C, 64))
    rows_kernel[grid](q, row_scale, out, R, C, BLOCK_R=16, BLOCK_C=64, DIVIDE=divide, COLUMN_MASK=column_mask)


def test_dequantize_rows_check(capsys):
    passed, stubbed, wrong = run_three(ch13.check_dequantize_rows, dequantize_rows,
                                       lambda q, row_scale, out: dequantize_rows(q, row_scale, out, divide=True),
                                       capsys)
    assert passed == "Exercise 13.4 (a 2-D grid: int8 rows): passed ✓"
    assert stubbed.startswith("Exercise 13.4 (a 2-D grid: int8 rows): not attempted yet")
    assert wrong.startswith("Exercise 13.4 (a 2-D grid: int8 rows): not yet ✗ - case 1: "
                            "dequantize_rows(q of shape (5, 37)): first mismatch at index")


def test_dequantize_rows_check_survives_a_forgotten_column_mask(capsys):
    # The issue-17 hole: this wrong kernel killed the Jupyter kernel ("corrupted size vs. prev_size") when the
    # learner allocated the output. The last row's tile runs 27 columns past the end of (5, 37).
    ch13.check_dequantize_rows(lambda q, row_scale, out: dequantize_rows(q, row_scale, out, column_mask=False))
    (line,) = outputs(capsys)
    assert line == ("Exercise 13.4 (a 2-D grid: int8 rows): not yet ✗ - case 1: dequantize_rows(q of shape (5, 37)): "
                    "your kernel wrote outside its output (27 values past its end); a lane whose index is past the "
                    "end must not store: mask the store")
