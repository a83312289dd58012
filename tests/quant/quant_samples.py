"""Test inputs shared by the 4-bit tests (test_nf4.py, test_kernels.py)."""

import torch


def sample(shape, dtype, seed: int) -> torch.Tensor:
    """Gaussian values with a few large ones (blocks get very different absmax) and an all-zero first block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x.view(-1)[::97] *= 10
    if x.numel() > 100:
        x.view(-1)[:64] = 0  # all-zero blocks for every blocksize up to 64
    return x.to(dtype)
