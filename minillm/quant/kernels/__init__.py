"""Triton kernels for int8 and NF4/FP4: dequantization and fused dequantize-matmul. Chapter 13 teaches them.

The launchers (plain Python functions that check their inputs, pick block sizes and start a kernel):

- `dequantize_4bit(packed, state, out_dtype=None, out=None)`: chapter 12's format back to floats, `torch.equal` to
  `minillm.quant.dequantize_4bit` and to bitsandbytes' `dequantize_4bit`;
- `dequantize_int8(q, row_scale, out_dtype=torch.float32)`: `q * row_scale` row by row;
- `matmul_4bit(x, packed, state)`: `x @ W.T` with W still packed, dequantized tile by tile in registers;
- `matmul_int8(x_q, x_scale, w_q, w_scale)`: int8 x int8 with int32 accumulation, then the two scales.

Without a GPU the same kernels run in Triton's interpreter (numpy on the CPU). Triton reads
`TRITON_INTERPRET` when a kernel is *decorated* with `@triton.jit`, not when triton is imported, so `common.py`
(imported first) sets it before any module defines a kernel. An explicit `TRITON_INTERPRET` (0 or 1) set by the
user wins. `INTERPRETED` says which mode the kernels were defined in. The interpreter differs from the GPU in
two ways that matter here (its fp32 -> bf16 cast truncates, and its bf16 `tl.dot` multiplies raw bits); the
kernels work around both only under the compile-time flag `INTERPRET`, so the GPU path never sees them.
"""

from minillm.quant.kernels.common import INTERPRETED  # first: it chooses the mode before any kernel exists
from minillm.quant.kernels.dequant import dequantize_4bit, dequantize_int8
from minillm.quant.kernels.matmul import matmul_4bit, matmul_int8

__all__ = ["INTERPRETED", "dequantize_4bit", "dequantize_int8", "matmul_4bit", "matmul_int8"]
