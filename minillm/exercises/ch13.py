"""Checks for chapter 13's exercises. Each learner function is a launcher that starts a Triton kernel; the
expected answers come from torch and from chapter 12's pure-torch `minillm.quant.nf4`, computed inside the check.

The inputs live on the device the package's kernels use: the CPU when they run in Triton's interpreter
(`minillm.quant.kernels.INTERPRETED`), the GPU otherwise. Sizes are odd on purpose, so a kernel whose last
program forgets its mask is caught. Where a forgotten mask would read memory past the input, the check places
the input at the start of a larger buffer filled with a loud sentinel, so the mistake shows up the same way on
every run instead of depending on whatever bytes happen to follow the tensor.
"""

import torch

from minillm.exercises import Mismatch, check, expect_equal, expect_tensor
from minillm.quant.nf4 import dequantize_4bit, get_4bit_code, quantize_4bit, unpack_nibbles

SENTINEL = 1.0e4  # what a kernel reads past the end of an input if it forgets its mask


def _device() -> torch.device:
    from minillm.quant import kernels  # sets TRITON_INTERPRET before any kernel exists, when there is no GPU
    return torch.device("cpu") if kernels.INTERPRETED else torch.device("cuda")


def _inside_sentinel_buffer(values: torch.Tensor, extra: int) -> torch.Tensor:
    """`values` copied to the start of a buffer `extra` elements longer, the rest SENTINEL; returns the view."""
    buffer = torch.full((values.numel() + extra,), SENTINEL, dtype=values.dtype, device=values.device)
    buffer[:values.numel()] = values
    return buffer[:values.numel()]  # (n,) a view: loads past its end see the sentinel




def _random(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale + shift  # (n,) fp32 on CPU


def check_unpack_nibbles(unpack_nibbles_kernel) -> None:
    """Exercise 13.1: `unpack_nibbles_kernel(packed)` turns (m,) uint8 bytes into (2m,) uint8 codes in 0..15,
    high nibble first, with a Triton kernel. Judged by chapter 12's `minillm.quant.nf4.unpack_nibbles`."""
    def case(packed: torch.Tensor):
        def run():
            expected = unpack_nibbles(packed)  # (2m,)
            got = unpack_nibbles_kernel(packed.to(_device()))
            what = f"unpack_nibbles_kernel({packed.numel()} bytes)"
            got = expect_tensor(got, expected, what)
            expect_equal(got.long(), expected.long(), what=what, atol=0, rtol=0)
        return run

    every_byte = torch.arange(256, dtype=torch.uint8)  # bytes >= 0x80 catch an arithmetic (sign-extending) shift
    odd = torch.randint(0, 256, (37,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    weights, _ = quantize_4bit(_random(2001, seed=2), blocksize=64)  # a real NF4 tensor, (1001, 1)
    cases = [case(every_byte), case(odd), case(weights.reshape(-1)), case(every_byte[200:201])]
    check("Exercise 13.1 (unpack nibbles in Triton)", cases,
          hint="load the bytes as uint8 with a mask, then store (byte >> 4) at 2*i and (byte & 0xF) at 2*i + 1, "
               "each store masked by i < m; if you view the bytes as int8, >> 4 drags the sign bit in")


def check_block_absmax(block_absmax) -> None:
    """Exercise 13.2: `block_absmax(x, blocksize)` gives the (ceil(n / blocksize),) fp32 absmax of each block of
    the 1-D fp32 x, the last block ragged. Judged by the absmax of `minillm.quant.nf4.quantize_4bit`."""
    def case(x: torch.Tensor, blocksize: int):
        def run():
            expected = quantize_4bit(x, blocksize=blocksize)[1].absmax  # (num_blocks,)
            x_in = _inside_sentinel_buffer(x.to(_device()), extra=blocksize)
            got = block_absmax(x_in, blocksize)
            what = f"block_absmax(x of {x.numel()} values, blocksize={blocksize})"
            got = expect_tensor(got, expected, what)
            if not torch.isfinite(got).all():
                raise Mismatch(f"{what}: got a non-finite absmax {got.tolist()}")
            if got.max() >= SENTINEL:
                raise Mismatch(f"{what}: the last block's absmax is {got[-1].item():g}, a value from past the end "
                               "of x; the last block has fewer than blocksize values, so mask its load")
            expect_equal(got, expected, what=what, atol=0, rtol=0)
        return run

    cases = [case(_random(1000, seed=3), 64),  # 15 full blocks and a tail of 40
             case(_random(77, seed=4, scale=3.0), 32),
             case(-torch.rand(333, generator=torch.Generator().manual_seed(5)), 128),  # all negative
             case(_random(256, seed=6, scale=0.02), 64)]  # no ragged tail
    check("Exercise 13.2 (mask the ragged tail)", cases,
          hint="one program per block: offsets = pid * BLOCKSIZE + tl.arange(0, BLOCKSIZE); load with "
               "mask=offsets < n and other=0.0 (which never wins a max of absolute values); tl.max(tl.abs(v), "
               "axis=0); launch cdiv(n, blocksize) programs")


def check_dequantize_nf4(dequantize_nf4) -> None:
    """Exercise 13.3: `dequantize_nf4(packed, absmax, code, n, blocksize)` gives the (n,) fp32 values
    `code[nibble i] * absmax[i // blocksize]` in one kernel. Judged by `minillm.quant.nf4.dequantize_4bit`."""
    def case(x: torch.Tensor, blocksize: int, quant_type: str):
        def run():
            packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
            expected = dequantize_4bit(packed, state).reshape(-1)  # (n,) fp32
            device = _device()
            n = x.numel()
            got = dequantize_nf4(packed.reshape(-1).to(device), state.absmax.to(device),
                                 get_4bit_code(quant_type).to(device), n, blocksize)
            what = f"dequantize_nf4({quant_type}, n={n}, blocksize={blocksize})"
            got = expect_tensor(got, expected, what)
            expect_equal(got, expected, what=what, atol=0, rtol=0)
        return run

    cases = [case(_random(1001, seed=7), 64, "nf4"),  # odd count: the last byte's low nibble is padding
             case(_random(4096, seed=8, scale=0.05), 64, "nf4"),
             case(_random(333, seed=9, scale=2.0, shift=-1.0), 32, "nf4"),
             case(_random(515, seed=10), 128, "fp4"),  # the same kernel with the other table
             case(_random(7, seed=11), 64, "nf4")]
    check("Exercise 13.3 (fuse the absmax scale into the dequantization)", cases,
          hint="value i lives in byte i // 2 (high nibble when i is even); look up tl.load(code_ptr + nibble) "
               "and multiply by tl.load(absmax_ptr + i // blocksize), masking every load and the store by i < n")


def check_dequantize_rows(dequantize_rows) -> None:
    """Exercise 13.4: `dequantize_rows(q, row_scale)` gives the (R, C) fp32 `q[i, j] * row_scale[i]` of an int8
    q with a 2-D grid of tiles. Judged by torch."""
    def case(rows: int, cols: int, seed: int):
        def run():
            g = torch.Generator().manual_seed(seed)
            q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
            row_scale = torch.rand(rows, generator=g) / 127 + 1e-3  # (R,) positive fp32
            expected = q.float() * row_scale[:, None]  # (R, C)
            device = _device()
            got = dequantize_rows(q.to(device), row_scale.to(device))
            what = f"dequantize_rows(q of shape {(rows, cols)})"
            got = expect_tensor(got, expected, what)
            expect_equal(got, expected, what=what, atol=0, rtol=0)
        return run

    cases = [case(5, 37, 12), case(33, 130, 13), case(1, 1000, 14), case(70, 3, 15)]
    check("Exercise 13.4 (a 2-D grid: int8 rows)", cases,
          hint="program (pid_r, pid_c) owns rows pid_r * BLOCK_R + tl.arange(0, BLOCK_R) and columns likewise; "
               "offsets = rows[:, None] * C + cols[None, :]; mask = (rows[:, None] < R) & (cols[None, :] < C); "
               "multiply by the (BLOCK_R, 1) row scales")

