"""A numpy-only autograd engine with torch's names and semantics (chapters 01–03).

`from minillm.engine import nn, optim` loads the layers and optimizers of chapter 03 on demand.
"""

from . import functional
from .random import manual_seed
from .tensor import Tensor, cat, is_grad_enabled, no_grad, stack, where

__all__ = ["Tensor", "no_grad", "is_grad_enabled", "cat", "stack", "where", "manual_seed", "functional"]
