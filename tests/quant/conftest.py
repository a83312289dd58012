"""Shared set-up for the quantization tests (chapters 11-15).

bitsandbytes logs a warning on import when the optional `kernels` package is missing (a faster CPU 4-bit
matmul) and one per call when `Linear8bitLt` casts inputs to fp16. Neither matters for these tests, which
compare against its always-present CPU paths; silence them so real warnings stay visible.
"""

import logging

import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's many small ops on one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`): on
    a busy 2-core machine, thread hand-offs made them four times slower. The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
