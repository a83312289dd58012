"""Set-up shared by every test module.

Triton decides interpreter or compiler for the parts of `triton.language` written in Triton itself when it is
first imported, and bitsandbytes imports it. Importing minillm's kernels first sets `TRITON_INTERPRET=1` on a
machine without CUDA before anything else can import triton, whatever order pytest collects the modules in
(chapter 13 and `minillm/quant/kernels/common.py` explain the trap).
"""

import minillm.quant.kernels  # noqa: F401  (imported for its side effect: the interpreter switch)
