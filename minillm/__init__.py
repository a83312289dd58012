"""minillm: the package that the course's chapters build, from a numpy autograd engine to QLoRA.

Chapter 00 explains how the course uses it. The package is the single source of truth: chapters show its
source with `minillm.show(obj)` and run it, so what a learner reads is what runs.
"""

from minillm.notebook import show

__version__ = "0.1.0"
__all__ = ["show", "__version__"]
