"""Shared set-up for the quantization tests (chapters 11-15).

bitsandbytes logs a warning on import when the optional `kernels` package is missing (a faster CPU 4-bit
matmul) and one per call when `Linear8bitLt` casts inputs to fp16. Neither matters for these tests, which
compare against its always-present CPU paths; silence them so real warnings stay visible.
"""

import logging


logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
