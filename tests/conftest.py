"""Set-up shared by every test module.

Triton decides interpreter or compiler for the parts of `triton.language` written in Triton itself when it is
first imported, and bitsandbytes imports it. Importing minillm's kernels first sets `TRITON_INTERPRET=1` on a
machine without CUDA before anything else can import triton, whatever order pytest collects the modules in
(chapter 13 and `minillm/quant/kernels/common.py` explain the trap).
"""

import minillm.quant.kernels  # noqa: F401  (imported for its side effect: the interpreter switch)
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's many small ops on one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`), as the
    notebooks do: on a busy 2-core machine, thread hand-offs made them four times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
