"""Checks for chapter 13's exercises. Each learner function is a Triton kernel or a launcher that starts one; the
expected answers come from bitsandbytes, torch and chapter 12's `minillm.quant.nf4`, computed inside the check.

The inputs live on the device the package's kernels use: the CPU when they run in Triton's interpreter
(`minillm.quant.kernels.INTERPRETED`), the GPU otherwise. Sizes are odd on purpose, so a kernel whose last
program forgets its mask is caught. A forgotten mask must fail the check, not crash the notebook: in the
interpreter an unmasked store really writes past the end of the output, and with an ordinary allocation that
corrupts the process's heap ("corrupted size vs. prev_size", the Jupyter kernel dies). So the checks allocate
every output themselves, inside a larger buffer whose guard regions (on both sides, larger than any block a
kernel could overrun by) hold a sentinel, and report a changed sentinel as the mistake it is. Inputs sit in
front of a sentinel too, so a load past their end reads the same loud value on every run.
"""

import copy
import math
from unittest import mock

import torch

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict
from minillm.quant.nf4 import QuantState, quantize_4bit, unpack_nibbles

SENTINEL = 1.0e4  # what a kernel reads past the end of an input if it forgets its mask
GUARD_BYTES = 2**16  # at least this much guard on each side of an output, more for large ones


def _device() -> torch.device:
    from minillm.quant import kernels  # sets TRITON_INTERPRET before any kernel exists, when there is no GPU
    return torch.device("cpu") if kernels.INTERPRETED else torch.device("cuda")


def _inside_sentinel_buffer(values: torch.Tensor, extra: int, fill=SENTINEL) -> torch.Tensor:
    """`values` copied to the start of a buffer `extra` elements longer, the rest `fill`; returns the view."""
    flat = values.reshape(-1)
    buffer = torch.full((flat.numel() + extra,), fill, dtype=values.dtype, device=values.device)
    buffer[:flat.numel()] = flat
    return buffer[:flat.numel()].view(values.shape)  # loads past its end see the fill value


class GuardedOutput:
    """An output tensor in the middle of a larger buffer filled with a sentinel, for a kernel to write into.

    The guards on either side are larger than the output itself, so a kernel that forgets a mask (and so
    writes up to a block past the end) changes the sentinel instead of someone else's memory.
    """

    def __init__(self, shape, dtype: torch.dtype, device: torch.device, fill=SENTINEL):
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.guard = max(4 * numel, GUARD_BYTES // itemsize)
        self.fill = torch.tensor(fill).to(dtype).item()  # the sentinel as the buffer stores it
        self.buffer = torch.full((self.guard + numel + self.guard,), self.fill, dtype=dtype, device=device)
        self.out = self.buffer[self.guard:self.guard + numel].view(shape)

    def check_guards(self, what: str) -> None:
        """Raise `Mismatch` if anything was written outside `out`."""
        before = (self.buffer[:self.guard] != self.fill).sum().item()
        after = (self.buffer[self.guard + self.out.numel():] != self.fill).sum().item()
        if before or after:
            where = (f"{after} values past its end" if after else "") + (" and " if before and after else "") + \
                    (f"{before} values before its start" if before else "")
            raise Mismatch(f"{what}: your kernel wrote outside its output ({where}); a lane whose index is "
                           "past the end must not store: mask the store")


def _launch(start):
    """Run `start()`, which launches a learner's kernel. The interpreter wraps whatever a kernel raises in an
    InterpreterError; unwrap it, so a stub's NotImplementedError reads as "not attempted" and any other
    mistake is reported as the error the learner's code raised."""
    from triton.runtime.errors import InterpreterError

    try:
        return start()
    except InterpreterError as wrapped:
        if wrapped.__cause__ is None:
            raise
        raise wrapped.__cause__ from None


def _random(n: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale + shift  # (n,) fp32 on CPU


def quant_state_from_bnb(bnb_state, device: torch.device | str = "cpu") -> QuantState:
    """bitsandbytes' QuantState as minillm's (bitsandbytes keeps the nested state in `state2`), on `device`."""
    nested = bnb_state.nested
    on = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    return QuantState(absmax=on(bnb_state.absmax), shape=bnb_state.shape, dtype=bnb_state.dtype,
                      blocksize=bnb_state.blocksize, quant_type=bnb_state.quant_type, code=on(bnb_state.code),
                      offset=on(bnb_state.offset) if nested else None,
                      nested_absmax=on(bnb_state.state2.absmax) if nested else None,
                      nested_code=on(bnb_state.state2.code) if nested else None,
                      nested_blocksize=bnb_state.state2.blocksize if nested else None)


# --- 13.1 (build) the 4-bit dequantization kernel ----------------------------------------------------------


@exercise("13.1", "the 4-bit dequantization kernel", kind="build", component="dequantize_4bit_kernel",
          replaces="minillm.quant.kernels.dequant:dequantize_4bit_kernel",
          hides=("kernels.dequant.dequantize_4bit_kernel.fn", "kernels.dequant.load_absmax.fn"))
def check_dequantize_4bit_kernel(dequantize_4bit_kernel) -> None:
    """Exercise 13.1: the learner's `dequantize_4bit_kernel`, launched by the package's launcher
    `minillm.quant.kernels.dequantize_4bit`, must decode bitsandbytes' packed bytes and state (NF4 and FP4,
    with and without double quantization, fp32/fp16/bf16) to exactly bitsandbytes' `dequantize_4bit`."""
    import bitsandbytes.functional as bnb_F  # imports triton: only after _device() has chosen the mode
    from minillm.quant.kernels import dequant

    def case(shape, dtype, quant_type, nested, seed, blocksize=64):
        def run():
            if not hasattr(dequantize_4bit_kernel, "__getitem__"):  # kernel[grid](...) is how a launcher starts it
                raise Mismatch(f"expected a @triton.jit kernel, got {type(dequantize_4bit_kernel).__name__}")
            x = _random(math.prod(shape), seed).reshape(shape).to(dtype)
            packed, bnb_state = bnb_F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                    compress_statistics=nested)
            expected = bnb_F.dequantize_4bit(packed, bnb_state)  # (shape) in dtype
            device = _device()
            state = quant_state_from_bnb(bnb_state, device)
            packed_in = _inside_sentinel_buffer(packed.to(device), extra=packed.numel() + 4096, fill=0xFF)
            absmax_fill = 0xFF if nested else SENTINEL
            state.absmax = _inside_sentinel_buffer(state.absmax, extra=state.absmax.numel() + 4096, fill=absmax_fill)
            guarded = GuardedOutput(shape, dtype, device)
            what = (f"{quant_type}{' with double quantization' if nested else ''}, shape {shape}, {str(dtype)[6:]}, "
                    f"blocksize {blocksize}")
            with mock.patch.object(dequant, "dequantize_4bit_kernel", dequantize_4bit_kernel):
                _launch(lambda: dequant.dequantize_4bit(packed_in, state, dtype, out=guarded.out))
            guarded.check_guards(what)
            got = guarded.out.cpu()
            expect_equal(got.float(), expected.float(), what=what, atol=0, rtol=0)
        return run

    cases = [case((64, 256), torch.float32, "nf4", False, seed=1),  # full blocks, one program
             case((1001,), torch.float32, "nf4", False, seed=2),  # odd count: a padding nibble, a ragged block
             case((6, 4096), torch.bfloat16, "fp4", False, seed=3),  # the other table; bf16 rounds once
             case((64, 256), torch.float32, "nf4", True, seed=4),  # double quantization
             case((3, 333), torch.float16, "nf4", True, seed=5, blocksize=32),
             case((300_001,), torch.float32, "nf4", True, seed=6)]  # several programs, several nested groups
    check("13.1", cases,
          hint="each program owns BLOCK bytes, that is 2·BLOCK values: for every value find its byte, which of "
               "the byte's two nibbles it is, and its block; switch off every lane past the end, for loads and "
               "for the store; with NESTED, decode the block's absmax before scaling by it",
          more="even-numbered values sit in the high nibble; a double-quantized absmax is its 8-bit code looked "
               "up in the nested table, times the fp32 scale of its group of NESTED_BLOCKSIZE blocks, plus the "
               "offset (two separate roundings, as chapter 12's dequantize_absmax); store through "
               "kernels.common.cast_to so bf16 rounds to nearest-even in the interpreter too")


def end_to_end_dequantize_kernel() -> bool:
    """The shipped model with every linear layer in 4 bits, its weights dequantized by the Triton kernel
    (`Int4Linear.use_kernel`, in the interpreter on a CPU) against the same model's torch path (chapter 12's
    `dequantize_4bit`): logits equal bit for bit, for NF4 with double quantization in fp32 and FP4 in bf16.

    Bit for bit is a sound claim on every CPU: both paths compute each weight as one fp32 product
    `code * absmax` (plus `+ offset` for a nested absmax), each correctly rounded, then one rounding to the
    compute dtype; the weights are therefore identical, and the rest of the model runs the same torch ops on
    them in the same order. Inside `use(dequantize_4bit_kernel=...)` the kernel is the learner's.
    """
    from minillm.pretrained import load_pretrained
    from minillm.quant import Int4Linear, dequantize_4bit, quantize_model

    _device()  # the kernels' mode is chosen before they are imported
    model, _ = load_pretrained()
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))  # (B, T)
    for quant_type, nested, dtype in [("nf4", True, torch.float32), ("fp4", False, torch.bfloat16)]:
        quantized = quantize_model(copy.deepcopy(model), quant_type, compress_statistics=nested, compute_dtype=dtype)
        layers = {name: m for name, m in quantized.named_modules() if isinstance(m, Int4Linear)}
        with torch.no_grad():
            torch_logits = quantized(ids)  # (B, T, vocab)
            for layer in layers.values():
                layer.use_kernel = True
            kernel_logits = _launch(lambda: quantized(ids))
        if not torch.equal(kernel_logits, torch_logits):
            torch_weights = {name: dequantize_4bit(layer.weight_packed, layer.quant_state, dtype=dtype)
                             for name, layer in layers.items()}
            first_bad = next((name for name, layer in layers.items()
                              if not torch.equal(_launch(layer.dequantized_weight), torch_weights[name])), None)
            detail = f"{quant_type}{' + double quantization' if nested else ''} in {str(dtype)[6:]}: " + (
                f"the weight of {first_bad} differs first" if first_bad else "the weights agree, the logits do not")
            return verdict(False, CLAIM_13, detail)
    return verdict(True, CLAIM_13)


CLAIM_13 = ("the shipped model's logits with every Int4Linear dequantized by your kernel equal the torch path's, "
            "bit for bit (NF4 + double quantization in fp32, FP4 in bf16)")


# --- practice --------------------------------------------------------------------------------------------


@exercise("13.2", "unpack nibbles in Triton")
def check_unpack_nibbles(unpack_nibbles_kernel) -> None:
    """Exercise 13.2: `unpack_nibbles_kernel(packed, out)` writes the (2m,) uint8 codes in 0..15 of the (m,) uint8
    bytes `packed` into `out`, high nibble first, with a Triton kernel. Judged by chapter 12's `unpack_nibbles`."""
    def case(packed: torch.Tensor):
        def run():
            expected = unpack_nibbles(packed)  # (2m,)
            device = _device()
            guarded = GuardedOutput(expected.shape, torch.uint8, device, fill=0xEE)  # 0xEE is no nibble
            what = f"unpack_nibbles_kernel({packed.numel()} bytes)"
            _launch(lambda: unpack_nibbles_kernel(_inside_sentinel_buffer(packed.to(device), 4096, 0xFF),
                                                  guarded.out))
            guarded.check_guards(what)
            expect_equal(guarded.out.cpu().long(), expected.long(), what=what, atol=0, rtol=0)
        return run

    every_byte = torch.arange(256, dtype=torch.uint8)  # bytes >= 0x80 catch an arithmetic (sign-extending) shift
    odd = torch.randint(0, 256, (37,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    weights, _ = quantize_4bit(_random(2001, seed=2), blocksize=64)  # a real NF4 tensor, (1001, 1)
    cases = [case(every_byte), case(odd), case(weights.reshape(-1)), case(every_byte[200:201])]
    check("13.2", cases,
          hint="each byte holds two codes: the first in its upper four bits, the second in its lower four; "
               "a byte read as a signed int8 shifts its sign bit in",
          more="one lane per byte, two masked stores per lane (positions 2i and 2i + 1); keep the bytes uint8 "
               "(or mask the shifted value to four bits)")


@exercise("13.3", "mask the ragged tail")
def check_block_absmax(block_absmax) -> None:
    """Exercise 13.3: `block_absmax(x, blocksize)` gives the (ceil(n / blocksize),) fp32 absmax of each block of
    the 1-D fp32 x, the last block ragged. Judged by torch (the max of |x| over each block, padded with zeros)."""
    def case(x: torch.Tensor, blocksize: int):
        def run():
            num_blocks = -(-x.numel() // blocksize)
            padded = torch.zeros(num_blocks * blocksize)
            padded[:x.numel()] = x.abs()
            expected = padded.view(num_blocks, blocksize).amax(dim=1)  # (num_blocks,)
            x_in = _inside_sentinel_buffer(x.to(_device()), extra=blocksize)
            what = f"block_absmax(x of {x.numel()} values, blocksize={blocksize})"
            got = expect_tensor(_launch(lambda: block_absmax(x_in, blocksize)), expected, what)
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
    check("13.3", cases,
          hint="one program per block; the last block is shorter than blocksize, so its load needs a mask, and "
               "the value a masked lane reads must never win the reduction",
          more="the masked lanes' `other` value should be one that can never exceed an absolute value; "
               "launch as many programs as there are blocks, rounding up")


@exercise("13.4", "a 2-D grid: int8 rows")
def check_dequantize_rows(dequantize_rows) -> None:
    """Exercise 13.4: `dequantize_rows(q, row_scale, out)` writes the (R, C) fp32 `q[i, j] * row_scale[i]` of an
    int8 q into `out` with a 2-D grid of tiles. Judged by torch."""
    def case(rows: int, cols: int, seed: int):
        def run():
            g = torch.Generator().manual_seed(seed)
            q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
            row_scale = torch.rand(rows, generator=g) / 127 + 1e-3  # (R,) positive fp32
            expected = q.float() * row_scale[:, None]  # (R, C)
            device = _device()
            guarded = GuardedOutput((rows, cols), torch.float32, device)
            what = f"dequantize_rows(q of shape {(rows, cols)})"
            q_in = _inside_sentinel_buffer(q.to(device), extra=4096, fill=127)
            scale_in = _inside_sentinel_buffer(row_scale.to(device), extra=4096)
            _launch(lambda: dequantize_rows(q_in, scale_in, guarded.out))
            guarded.check_guards(what)
            expect_equal(guarded.out.cpu(), expected, what=what, atol=0, rtol=0)
        return run

    cases = [case(5, 37, 12), case(33, 130, 13), case(1, 1000, 14), case(70, 3, 15)]
    check("13.4", cases,
          hint="program (pid_r, pid_c) owns a tile of rows and a tile of columns; both can run past the end of "
               "the matrix, so the mask needs both conditions",
          more="build the tile's offsets by broadcasting a column of row indices against a row of column "
               "indices (row-major: row times the number of columns plus column); the row scales broadcast "
               "the same way")
