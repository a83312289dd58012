"""Why minillm's `quantize_blockwise` equals bitsandbytes' CPU quantizer on every CPU (chapters 11 and 15).

bitsandbytes' C quantizer (libbitsandbytes_cpu.so, x86-64 build) computes the grid index of a scaled value v as
trunc(fma(t, 65535, 0.5)) with t = (v + 1) * 0.5 (one `vfmadd213ss`), and builds its grid-to-code table from
(2g) / 65535 - 1; minillm computes fl(fl(t * 65535) + 0.5) and g * fl(2 / 65535) - 1 with separate torch ops.
This script checks, exhaustively, that (a) both grid formulas truncate to the same integer for every fp32 t in
[0, 1] (fused or not, so also for a build that does not fuse), and (b) both tables agree for both dynamic maps.
About a minute of one core:  python scripts/quantizer_fma_proof.py
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm.quant.blockwise import _grid_to_code, create_dynamic_map  # noqa: E402


def grid_index_differences() -> int:
    differ, end, chunk = 0, 0x3F800000 + 1, 1 << 24  # every fp32 bit pattern from 0.0 to 1.0
    for start in range(0, end, chunk):
        t = np.arange(start, min(start + chunk, end), dtype=np.uint32).view(np.float32)
        # t * 65535 + 0.5 is exact in 80-bit long double (64-bit significand) for t >= 2^-18; one rounding to fp32
        # then is the fused result. Below 2^-18 both forms stay under 1 and truncate to 0.
        fused = (t.astype(np.longdouble) * 65535 + np.longdouble(0.5)).astype(np.float32)
        unfused = t * np.float32(65535) + np.float32(0.5)
        relevant = t >= np.float32(2.0**-18)
        differ += int((np.trunc(fused) != np.trunc(unfused))[relevant].sum())
    return differ


def table_differences(signed: bool) -> int:
    code = create_dynamic_map(signed=signed)
    values = code.numpy()
    midpoints = ((values[:-1] + values[1:]) * np.float32(0.5)).astype(np.float32)
    g = np.arange(65536, dtype=np.float32)
    grid = (g + g) / np.float32(65535) - np.float32(1)  # bitsandbytes' arithmetic, fp32 throughout
    theirs = np.searchsorted(midpoints, grid, side="left")  # number of midpoints strictly below the grid point
    ours = _grid_to_code(tuple(code.tolist())).numpy()
    return int((ours != theirs).sum())


if __name__ == "__main__":
    assert np.finfo(np.longdouble).nmant >= 63, "needs an 80-bit long double (x86-64)"
    print(f"grid index, fused vs unfused: {grid_index_differences()} differences over 1,065,353,217 fp32 values")
    for signed in (True, False):
        print(f"{'signed' if signed else 'unsigned'} map: grid-to-code tables differ at {table_differences(signed)} "
              "of 65536 points")
