"""4-bit blockwise quantization: the NF4 and FP4 codes, nibble packing and double quantization.

Chapter 12 teaches this module. It matches bitsandbytes 0.50 on CPU bit for bit:
`bitsandbytes.functional.get_4bit_type` (the code tables), `quantize_4bit` (packed bytes, absmax and the
nested state of double quantization) and `dequantize_4bit` (outputs, against bitsandbytes' pure-torch path;
see `dequantize_4bit` for where its default CPU path is wrong), for fp32, fp16 and bf16.

The idea in four steps (QLoRA, Dettmers et al., 2023):

1. Cut the flattened tensor into blocks of `blocksize` values (the last block may be shorter) and divide each
   block by its absmax, so every value lies in [-1, 1].
2. Replace each value by the index (0..15) of the nearest of 16 code values: NF4's are quantiles of a normal
   distribution, so on normally distributed weights the indices are used far more evenly than a uniform
   grid's (not equally: chapter 12 measures it); FP4's are a tiny floating-point format.
3. Pack two 4-bit indices into each byte.
4. Optionally (double quantization) store the fp32 absmax values themselves in 8 bits, with chapter 11's
   `quantize_blockwise`, in blocks of 256.

Storage per value: 4 bits + 32 / blocksize bits of absmax; with double quantization
4 + 8 / blocksize + 32 / (256 * blocksize) bits (`bits_per_parameter` measures it).
"""

import math
from dataclasses import dataclass, replace

import torch

from minillm.quant.blockwise import (FLOAT_DTYPES, _check_blocksize, _check_finite, _check_float_tensor,
                                     create_dynamic_map, dequantize_blockwise, quantize_blockwise)

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # double quantization: one fp32 scale per 256 absmax values, as bitsandbytes
# The outermost quantile of NF4: halfway between 1 - 1/(2*15) and 1 - 1/(2*16), QLoRA's choice, which keeps
# the normal's infinite tails from pulling the outermost code values to +-infinity.
NF4_OFFSET = 0.9677083


# ------------------------------------------------------------------------------------------- codes
def create_nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The (16,) fp32 NormalFloat code, sorted from -1 to 1 with 0 at index 7.

    Chapter 12 derives it. Equal to `bitsandbytes.functional.get_4bit_type("nf4")` (which hard-codes the
    values its `create_normal_map` computed with scipy). Split [1 - offset, offset] at evenly spaced
    probabilities and take the normal quantile (inverse CDF, `torch.special.ndtri`) of each point: 8 points
    on the positive side, 7 on the negative, plus an exact 0, so zero (padding, pruned weights) is
    representable and the code still has 16 = 2^4 values. Then scale so the largest value is 1.

    The probabilities are an fp32 `linspace` and the quantiles are computed in float64 and rounded to fp32,
    as bitsandbytes did; computing everything in fp32 moves some values by an ulp.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # (7,)
    code = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
    return code / code.max()


def create_fp4_code() -> torch.Tensor:
    """The (16,) fp32 FP4 code in bit-pattern order: entry k is the value of the 4 bits of k.

    Chapter 12 teaches this. Equal to `bitsandbytes.functional.get_4bit_type("fp4")`. Bit 3 is the sign, bits
    2-1 an exponent field e, bit 0 a mantissa bit m. e = 0 is subnormal, m * 0.0625; e = 1, 2, 3 are
    2^3, 2^2, 2^1 times (1 + m/2) (bitsandbytes counts the exponent down). Divided by the largest
    magnitude, 12, so the code spans [-1, 1]. Codes 0 and 8 are both zero: FP4 wastes one of its 16 values.
    The bits of code 8 say -0, but bitsandbytes' table holds +0 there (it writes the entry as the Python
    integer -0, which is 0), and so does ours, so that dequantized zeros match it sign bit and all.
    """
    values = []
    for k in range(16):
        sign, e, m = k >> 3, (k >> 1) & 0b11, k & 1
        magnitude = m * 0.0625 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)
        values.append(-magnitude if sign and magnitude else magnitude)  # +0, not -0, for code 8
    code = torch.tensor(values, dtype=torch.float32)  # (16,)
    return code / code.abs().max()


def get_4bit_code(quant_type: str) -> torch.Tensor:
    """(16,) fp32 code of "nf4" or "fp4". Chapter 12. Matches `bitsandbytes.functional.get_4bit_type`."""
    _check_quant_type("get_4bit_code", quant_type)
    return create_nf4_code() if quant_type == "nf4" else create_fp4_code()


# ----------------------------------------------------------------------------------------- packing
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(2m,) uint8 codes in 0..15 -> (m,) uint8 bytes: element 2i in the high nibble, 2i+1 in the low one.

    Chapter 12 teaches this. bitsandbytes' byte order: the first value of each pair is the high nibble.
    """
    return (codes[0::2] << 4) | codes[1::2]  # (m,)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(m,) uint8 bytes -> (2m,) uint8 codes in 0..15, high nibble first. Undoes `pack_nibbles`. Chapter 12."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)  # (m, 2) -> (2m,)


# ------------------------------------------------------------------------------------ quant state
@dataclass
class QuantState:
    """What `dequantize_4bit` needs besides the packed bytes. Chapter 12. Mirrors bitsandbytes' `QuantState`.

    Without double quantization `absmax` is the (num_blocks,) fp32 absmax of each block. With it
    (`nested` is True) `absmax` holds (num_blocks,) uint8 codes of `absmax - offset` in the dynamic map
    `nested_code`, with one fp32 `nested_absmax` per `nested_blocksize` (= 256) of them; bitsandbytes keeps
    the last three in `state.state2` (`.absmax`, `.code`, `.blocksize`) and `offset` in `state.offset`.
    """

    absmax: torch.Tensor  # (num_blocks,) fp32, or uint8 when double-quantized
    shape: torch.Size  # of the original tensor
    dtype: torch.dtype  # of the original tensor; dequantize_4bit returns this by default
    blocksize: int
    quant_type: str  # "nf4" or "fp4"
    code: torch.Tensor  # (16,) fp32, get_4bit_code(quant_type)
    offset: torch.Tensor | None = None  # () fp32, mean of the absmax values (double quantization only)
    nested_absmax: torch.Tensor | None = None  # (ceil(num_blocks / 256),) fp32
    nested_code: torch.Tensor | None = None  # (256,) fp32, create_dynamic_map()
    nested_blocksize: int | None = None  # 256

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


# ------------------------------------------------------------------------------- quantize / dequantize
def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  compress_statistics: bool = False) -> tuple[torch.Tensor, QuantState]:
    """4-bit blockwise quantization of x (any shape): (packed ((n + 1) // 2, 1) uint8, QuantState).

    Chapter 12 teaches this. Matches `bitsandbytes.functional.quantize_4bit` on CPU: equal packed bytes,
    absmax and, with `compress_statistics=True` (double quantization), equal offset and nested state.
    Note that bitsandbytes defaults to quant_type="fp4"; we default to NF4, QLoRA's choice.

    Rounding, exactly as bitsandbytes: a value goes to the code entry whose fp32 midpoints enclose it, and a
    value exactly on a midpoint goes to the lower entry. fp16 and bf16 inputs are widened to fp32 exactly, so
    they get the codes of their fp32 copy.
    """
    _check_float_tensor("quantize_4bit", x)
    _check_finite("quantize_4bit", x)
    _check_blocksize("quantize_4bit", blocksize, allowed=BLOCKSIZES_4BIT)
    _check_quant_type("quantize_4bit", quant_type)
    if not isinstance(compress_statistics, bool):
        raise TypeError(f"quantize_4bit: compress_statistics must be True (double quantization) or False, "
                        f"got {compress_statistics!r}")
    code = get_4bit_code(quant_type).to(x.device)  # (16,)

    flat = x.reshape(-1).float()  # (n,)
    n = flat.numel()
    full = n - n % blocksize  # values in whole blocks; the rest form the ragged last block
    blocks = flat[:full].view(-1, blocksize)  # (full // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (full // blocksize,)
    # The floor 1e-38 turns an all-zero block's 0 / 0 into 0 * 1e38 = 0 (code of zero); absmax stays 0.
    # Whole blocks multiply by the reciprocal, the ragged block divides: bitsandbytes does both, and they
    # differ in the last bit often enough to change a code now and then. (bitsandbytes also clamps to
    # [-1, 1]; a value rounded to just beyond 1 lands in the end bucket either way, so we do not.)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)  # (full,)
    if full < n:
        tail_absmax = flat[full:].abs().amax()  # ()
        absmax = torch.cat([absmax, tail_absmax[None]])  # (num_blocks,)
        scaled = torch.cat([scaled, flat[full:] / tail_absmax.clamp(min=1e-38)])  # (n,)
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # one 0.0, so the last byte has two nibbles

    # Nearest entry: sort the code (FP4's is in bit order), count the midpoints below each value (bucketize
    # puts a value equal to a midpoint below it, i.e. ties go to the lower entry), map back to code indices.
    # FP4 holds zero twice; the stable sort puts index 0 before index 8, as bitsandbytes' sort does, so 0.0
    # and tiny negatives get FP4 code 0 and tiny positives code 8.
    order = torch.argsort(code, stable=True)  # (16,)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2  # (15,)
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)  # (n or n + 1,) in 0..15
    packed = pack_nibbles(codes)[:, None]  # ((n + 1) // 2, 1), bitsandbytes' layout

    state = QuantState(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code)
    if compress_statistics:
        # Double quantization: absmax values are positive and similar, so subtract their mean to use the
        # signed dynamic map's full range, then store them in 8 bits, blockwise.
        offset = absmax.mean()  # ()
        nested_code = create_dynamic_map(signed=True)  # (256,)
        absmax_codes, nested_absmax = quantize_blockwise(absmax - offset, nested_code, blocksize=NESTED_BLOCKSIZE)
        state = replace(state, absmax=absmax_codes, offset=offset, nested_absmax=nested_absmax,
                        nested_code=nested_code, nested_blocksize=NESTED_BLOCKSIZE)
    return packed, state


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """(num_blocks,) fp32 absmax of each block, undoing double quantization if it was used. Chapter 12.

    As bitsandbytes' `dequantize_4bit` does it: `dequantize_blockwise` in fp32, then `+ offset` (a second
    rounding, so the absmax is not exactly what `dequantize_blockwise` alone would give).
    """
    if not state.nested:
        return state.absmax
    return dequantize_blockwise(state.absmax, state.nested_absmax, state.nested_code,
                                blocksize=state.nested_blocksize, dtype=torch.float32) + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo `quantize_4bit`: `code[index] * absmax` of each value's block in fp32, rounded once to `dtype`.

    Chapter 12 teaches this. Returns a tensor of `state.shape` in `dtype` (default `state.dtype`). Equal to
    bitsandbytes' pure-torch `_dequantize_4bit_compute` (`bitsandbytes.backends.default.ops`) everywhere,
    and to `bitsandbytes.functional.dequantize_4bit` wherever its CPU kernel is right.

    Where it is not: on AVX512 CPUs bitsandbytes' C kernel (used when the last dimension is even and
    blocksize < 2048) finds a value's block as `row * (ncols // blocksize) + col // blocksize`, as if every
    row started a new block. That is wrong when the last dimension is not a multiple of the blocksize and a
    row spans more than one block, e.g. shape (3, 96) with blocksize 64. We index blocks over the flattened
    tensor, as quantization made them.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_4bit: state must be the QuantState from quantize_4bit, "
                        f"got {type(state).__name__}")
    n = math.prod(state.shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        got = (f"{packed.dtype} with {packed.numel()} elements" if isinstance(packed, torch.Tensor)
               else type(packed).__name__)
        raise ValueError(f"dequantize_4bit: a tensor of shape {tuple(state.shape)} packs into {(n + 1) // 2} "
                         f"uint8 bytes, got {got}; pass the packed tensor quantize_4bit returned with this state")
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize_4bit: dtype must be one of {FLOAT_DTYPES}, got {dtype}")

    codes = unpack_nibbles(packed.reshape(-1))[:n].long()  # (n,) in 0..15, the odd count's padding dropped
    scale = dequantize_absmax(state).repeat_interleave(state.blocksize)[:n]  # (n,) each value's block absmax
    values = state.code.to(packed.device)[codes] * scale  # (n,) fp32
    return values.to(dtype).reshape(state.shape)


# ------------------------------------------------------------------------------------------ memory
def bits_per_parameter(packed: torch.Tensor, state: QuantState) -> float:
    """Bits of storage per quantized value, counted from the bytes of the actual tensors. Chapter 12.

    Counts the packed bytes, the absmax (fp32, or uint8 codes when double-quantized), and with double
    quantization the offset and the nested fp32 absmax. The code tables (16 and 256 fp32 values) are shared
    by every tensor of the same format, so, like the QLoRA paper, we leave them out. For blocksize 64 this
    gives 4 + 32/64 = 4.5 bits, and 4 + 8/64 + 32/(64 * 256) = 4.127 bits with double quantization (plus
    32 / n for the offset, which vanishes for large tensors).
    """
    tensors = [packed, state.absmax]
    if state.nested:
        tensors += [state.offset, state.nested_absmax]
    total_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return 8 * total_bytes / math.prod(state.shape)


# ------------------------------------------------------------------------------------------ checks
def _check_quant_type(where: str, quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{where}: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
