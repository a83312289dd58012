"""The engine's default random number generator, the numpy twin of torch's default generator.

Chapter 03 uses it: `nn` initialises weights from it and `functional.dropout` draws its masks from it,
so one `manual_seed(0)` makes a whole training run repeatable.
"""

import numpy as np

# Like torch's, the default generator starts from a fixed seed, so unseeded runs repeat too.
_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the default generator in place (objects holding it see the new stream), like torch.manual_seed."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"manual_seed: seed must be an int, got {type(seed).__name__}")
    _generator.bit_generator.state = np.random.default_rng(seed).bit_generator.state


def default_generator() -> np.random.Generator:
    """The generator `nn` init and `functional.dropout` draw from when none is passed."""
    return _generator
