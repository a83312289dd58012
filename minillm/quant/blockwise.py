"""8-bit blockwise dynamic quantization: the dynamic map, `quantize_blockwise`, `dequantize_blockwise`.

Chapter 11 teaches this module; chapter 12 reuses it to double-quantize NF4's absmax, and chapter 15's 8-bit
optimizers store their Adam states with it. It matches bitsandbytes 0.50 on CPU bit for bit:
`bitsandbytes.functional.create_dynamic_map`, `quantize_blockwise` (codes and absmax) and
`dequantize_blockwise` (outputs), for fp32, fp16 and bf16.

The idea in three steps:

1. Cut the flattened tensor into blocks of `blocksize` values (the last block may be shorter).
2. Divide each block by its absmax, so every value lies in [-1, 1] and one outlier only spoils its own block.
3. Replace each value by the index of a nearby entry of a 256-entry code, the *dynamic map*, which spends
   its entries on every order of magnitude from 1e-7 to 1 instead of spacing them evenly.

Storage: one byte per value plus one fp32 absmax per block (4 / blocksize bytes per value).
"""

import functools

import torch

# bitsandbytes' CUDA kernels take exactly these; its CPU backend takes any positive blocksize. We allow the
# set that works everywhere.
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bitsandbytes' CPU quantizer snaps every scaled value onto this many evenly spaced points in [-1, 1].
_GRID_POINTS = 65536


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """The (256,) fp32 dynamic 8-bit code, sorted. Matches `bitsandbytes.functional.create_dynamic_map`.

    Chapter 11 teaches this. Dettmers' dynamic type reads a byte as sign, exponent (a run of zero bits) and
    fraction: the more zero bits, the smaller the decade and the fewer bits left for the fraction. Written
    as values: decade e = 0..6 covers (1e-7, 1e-6] ... (0.1, 1] and gets the bin centres of
    `linspace(0.1, 1, n + 1)` scaled by 10^(e-6), with n = 2^e entries per sign (signed) or 2^(e+1) (unsigned,
    for values known to be >= 0 such as Adam's second moment). Add 0 and 1.0, and there are
    2 * 127 + 2 = 256 (signed) or 254 + 2 = 256 (unsigned) values. The signed map has no -1: its smallest
    entry is about -0.993.

    Everything is computed in fp32 as bitsandbytes does; in float64 a few entries differ in the last bits.
    """
    if not isinstance(signed, bool):
        raise TypeError(f"create_dynamic_map: signed must be True or False, got {signed!r}")
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        n = 2**e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)  # (n + 1,)
        centres = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)  # (n,)
        values += [centres, -centres] if signed else [centres]
    return torch.cat(values).sort().values  # (256,)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor | None = None,
                       blocksize: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization: (uint8 codes shaped like x, fp32 absmax of shape (ceil(n / blocksize),)).

    Chapter 11 teaches this. Matches `bitsandbytes.functional.quantize_blockwise` on CPU (its C kernel):
    equal codes and absmax for fp32, fp16 and bf16 inputs. `code` defaults to the signed dynamic map.

    bitsandbytes' CPU kernel does not search the 256 entries for each value. It snaps the scaled value onto
    a grid of 65536 evenly spaced points in [-1, 1] and looks up the code entry nearest to that grid point
    in a precomputed table. So the chosen entry is nearest to the grid point, not always to the value: for
    about 0.15% of normal data it is one or two entries off. We copy the grid to match it bit for bit.
    """
    _check_float_tensor("quantize_blockwise", x)
    _check_finite("quantize_blockwise", x)
    _check_blocksize("quantize_blockwise", blocksize)
    code = create_dynamic_map() if code is None else _check_code("quantize_blockwise", code)

    flat = x.reshape(-1).float()  # (n,)  fp16 and bf16 widen to fp32 exactly
    n = flat.numel()
    num_blocks = -(-n // blocksize)
    # Zero padding never raises a block's absmax, so the short last block gets the absmax of its own values.
    blocks = torch.nn.functional.pad(flat, (0, num_blocks * blocksize - n)).view(num_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (num_blocks,)

    # Multiply by the reciprocal, as bitsandbytes does (on the 65536-point grid a division gives the same codes).
    # An all-zero block has absmax 0: scale it by 0 instead of 1/0; its codes are set below.
    reciprocal = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # (num_blocks,)
    scaled = (blocks * reciprocal[:, None]).clamp(-1.0, 1.0)  # (num_blocks, blocksize)
    # ((scaled + 1) * 0.5) * 65535 + 0.5, in place and in this order (each step rounds in fp32, as in C);
    # the cast to int truncates, as C's does, so this rounds to the nearest grid point 0..65535.
    grid_index = scaled.add_(1.0).mul_(0.5).mul_(_GRID_POINTS - 1).add_(0.5).to(torch.int32)
    table = _grid_to_code(tuple(code.tolist())).to(x.device)  # (65536,)
    codes = table.index_select(0, grid_index.view(-1)).view(num_blocks, blocksize)  # table[grid_index]
    # bitsandbytes' C loop computes 0 * (1/0) = NaN for an all-zero block and stores code 0 (the most
    # negative entry); dequantizing gives code[0] * 0 = -0.0, so nothing is lost.
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                         blocksize: int = 4096, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Undo `quantize_blockwise`: `code[codes] * absmax` of each value's block, in fp32, rounded once to `dtype`.

    Chapter 11 teaches this. Matches `bitsandbytes.functional.dequantize_blockwise` on CPU bit for bit.
    `code` and `blocksize` must be the ones used to quantize.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"dequantize_blockwise: codes must be a torch.uint8 tensor (from quantize_blockwise), "
                        f"got {got}")
    if codes.numel() == 0:
        raise ValueError("dequantize_blockwise: codes is empty; there is nothing to dequantize")
    _check_blocksize("dequantize_blockwise", blocksize)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize_blockwise: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    code = create_dynamic_map() if code is None else _check_code("dequantize_blockwise", code)
    n = codes.numel()
    num_blocks = -(-n // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.shape != (num_blocks,):
        got = (f"{absmax.dtype} of shape {tuple(absmax.shape)}" if isinstance(absmax, torch.Tensor)
               else type(absmax).__name__)
        raise ValueError(f"dequantize_blockwise: {n} codes in blocks of {blocksize} need an fp32 absmax of shape "
                         f"({num_blocks},), got {got}; pass the blocksize used to quantize")

    scale = absmax.repeat_interleave(blocksize)[:n]  # (n,)  each value's block absmax
    values = code.to(codes.device).index_select(0, codes.reshape(-1).int()) * scale  # (n,)  code[codes], fp32
    return values.to(dtype).reshape(codes.shape)


@functools.lru_cache(maxsize=8)
def _grid_to_code(code_values: tuple[float, ...]) -> torch.Tensor:
    """(65536,) uint8: for grid point g = -1 + 2g/65535, the index of the nearest entry of the sorted code.

    Cached per code (a tuple, so it can be a cache key): 65536 binary searches cost a few milliseconds, more
    than quantizing a small tensor.
    """
    code = torch.tensor(code_values, dtype=torch.float32)  # (256,)  exact: the floats came from fp32
    grid = torch.arange(_GRID_POINTS, dtype=torch.float32) * (2.0 / (_GRID_POINTS - 1)) - 1.0  # (65536,)
    midpoints = (code[:-1] + code[1:]) / 2  # (255,)
    # The nearest entry is the number of midpoints that lie below the grid point.
    return torch.bucketize(grid, midpoints).to(torch.uint8)


# ------------------------------------------------------------------------------------------ checks
def _check_float_tensor(where: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{where}: got an empty tensor of shape {tuple(x.shape)}; there is nothing to quantize")


def _check_finite(where: str, x: torch.Tensor) -> None:
    """A NaN or inf has no code: it would turn a whole block's absmax, or the grid index, into garbage.
    bitsandbytes 0.50 raises nothing and documents nothing for it (on CPU a NaN gets code 0 and comes back as
    code[0] * absmax, about -absmax; an inf makes its block's absmax inf), so we stop with a clear error."""
    bad = ~torch.isfinite(x.reshape(-1))  # (n,)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise ValueError(f"{where}: x holds {int(bad.sum())} NaN or infinite value(s), the first at flat index "
                         f"{first} ({x.reshape(-1)[first].item()}); only finite values can be quantized")


def _check_blocksize(where: str, blocksize, allowed: tuple[int, ...] = BLOCKSIZES) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"{where}: blocksize must be a power of two from {allowed[0]} to {allowed[-1]} "
                         f"(one of {allowed}), got {blocksize!r}")


def _check_code(where: str, code) -> torch.Tensor:
    if not isinstance(code, torch.Tensor) or code.dtype != torch.float32 or code.shape != (256,):
        got = f"{code.dtype} of shape {tuple(code.shape)}" if isinstance(code, torch.Tensor) else type(code).__name__
        raise ValueError(f"{where}: code must be a (256,) float32 tensor such as create_dynamic_map(), got {got}")
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError(f"{where}: code must be sorted ascending (create_dynamic_map() is)")
    return code
