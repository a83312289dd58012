"""What every kernel module shares: the interpreter switch, one rounding helper, input checks. Chapter 13.

Imported before any module that defines a kernel, because `TRITON_INTERPRET` must be set before the first
`@triton.jit` runs. The same holds for the parts of `triton.language` that are themselves written in Triton
(`tl.zeros`, `tl.interleave`, `tl.cdiv`, `tl.softmax`, `tl.sort`, ... in `triton/language/standard.py`):
they are decorated when triton is first imported, so if something imported triton before the variable was
set (bitsandbytes does), calling them in the interpreter fails with "Cannot call @triton.jit'd outside of
the scope of a kernel". Our kernels therefore use only built-in operations (`tl.full`, `tl.join`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # an explicit user setting wins

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

INTERPRETED: bool = bool(knobs.runtime.interpret)  # read the way triton.jit reads it
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x rounded to nearest-even in `dtype`, as torch's `.to(dtype)` does.

    The interpreter's fp32 -> bf16 cast truncates (drops the low 16 bits) instead of rounding, so there we
    round with integer arithmetic: add 0x7FFF plus the lowest kept bit (ties to even), then keep the high
    half. The GPU's cast rounds correctly and takes the plain branch. (Finite x only, which is all we have.)
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def launch_options(num_warps: int, num_stages: int | None = None) -> dict:
    """Keyword arguments for every kernel launch: the GPU's warps (and pipeline stages) per program, and
    `enable_fp_fusion=False`. The interpreter ignores them all.

    `enable_fp_fusion=False`: Triton would otherwise fuse `a * b + c` into one fused multiply-add on the GPU
    (rounding once where torch and bitsandbytes round twice), and a dequantized double-quant absmax would
    differ from theirs in the last bit. Saying it explicitly also silences Triton 3.9's warning that the
    default is about to change.
    """
    stages = {} if num_stages is None else {"num_stages": num_stages}
    return {"num_warps": num_warps, **stages, "enable_fp_fusion": False}


def check_tensor(where: str, name: str, t, dtypes: tuple[torch.dtype, ...], ndim: int | None = None) -> None:
    """Raise a TypeError/ValueError naming `where` and `name` unless t is a tensor of one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{where}: {name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{where}: {name} is empty (shape {tuple(t.shape)}); there is nothing to compute")


def check_devices(where: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and on a CUDA device unless the kernels run in the interpreter."""
    devices = {name: t.device for name, t in tensors.items()}
    device = next(iter(devices.values()))
    if any(d != device for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{where}: all tensors must be on one device, got {listing}; move them with .to(device)")
    if not INTERPRETED and device.type != "cuda":
        raise ValueError(f"{where}: the kernels are compiled for the GPU, so tensors must be on CUDA, got {device}; "
                         "move them with .cuda() (or set TRITON_INTERPRET=1 before importing to use the interpreter)")
    return device


def check_out_dtype(where: str, dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: out_dtype must be one of {FLOAT_DTYPES}, got {dtype}")
