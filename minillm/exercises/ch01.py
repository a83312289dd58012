"""Checks for chapter 01's exercises: numpy and torch judge every answer.

The exercises work on shapes and strides alone (plain tuples and numpy arrays), so they need nothing from
`minillm.engine`: broadcasting is judged by `np.broadcast_shapes`, strides by the arrays numpy allocates,
strided views by `torch.as_strided`, and summing a broadcast back by `torch.autograd` through `expand`.
"""

import numpy as np
import torch

from minillm.exercises import Mismatch, check, expect_equal

_DTYPE_OF_ITEMSIZE = {1: np.int8, 2: np.float16, 4: np.float32, 8: np.float64}


def _as_shape(got, call: str) -> tuple:
    """A learner's shape answer as a tuple of ints, or `Mismatch` saying what came back instead."""
    if not isinstance(got, tuple):
        raise Mismatch(f"{call} should return a tuple (like numpy's .shape and .strides), got {type(got).__name__} "
                       f"{got!r}")
    return tuple(int(n) for n in got)


def check_broadcast_shape(broadcast_shape) -> None:
    """Exercise 1.1: the shape two shapes broadcast to, or a ValueError when they cannot."""

    def case(a, b):
        def run():
            call = f"broadcast_shape({a}, {b})"
            try:
                expected = np.broadcast_shapes(a, b)
            except ValueError:
                expected = None
            try:
                got = broadcast_shape(a, b)
            except ValueError:
                if expected is None:
                    return
                raise Mismatch(f"{call}: expected {expected}, but your code raised ValueError") from None
            if expected is None:
                raise Mismatch(f"{call} should raise ValueError (these shapes cannot be broadcast), got {got!r}")
            got = _as_shape(got, call)
            if got != expected:
                raise Mismatch(f"{call}: expected {expected}, got {got}")
        return run

    pairs = [((3, 1), (1, 4)), ((5, 4), (4,)), ((8, 1, 6, 1), (7, 1, 5)), ((), (2, 3)), ((4, 3), (3, 4)),
             ((2, 1), (8, 4, 3)), ((1,), (3, 1, 1)), ((6, 1, 2), (6, 2))]
    check("Exercise 1.1 (broadcast shape)", [case(a, b) for a, b in pairs],
          hint="pad the shorter shape with 1s on the LEFT so both have the same length, then compare dim by dim: "
               "equal sizes stay, a 1 stretches to the other size, anything else is a ValueError")


def check_contiguous_strides(contiguous_strides) -> None:
    """Exercise 1.2: the byte strides of a C-contiguous (row-major) array of a given shape and item size."""

    def case(shape, itemsize):
        def run():
            expected = np.empty(shape, dtype=_DTYPE_OF_ITEMSIZE[itemsize]).strides
            call = f"contiguous_strides({shape}, itemsize={itemsize})"
            got = _as_shape(contiguous_strides(shape, itemsize), call)
            if got != expected:
                raise Mismatch(f"{call}: expected {expected} (numpy's strides), got {got}")
        return run

    cases = [((3, 4), 8), ((2, 3, 4), 4), ((5,), 2), ((1, 5, 1), 8), ((7, 3, 5, 2), 4), ((2, 1, 3, 1), 1),
             ((), 8)]
    check("Exercise 1.2 (contiguous strides)", [case(s, n) for s, n in cases],
          hint="the last dim steps by one item (itemsize bytes); each dim to its left steps over a whole row of "
               "the dims to its right: stride[k] = itemsize * (product of shape[k+1:])")


def check_as_strided(as_strided) -> None:
    """Exercise 1.3: read a strided view out of a flat buffer, like `torch.as_strided` (strides in elements)."""

    def case(buffer_size, shape, strides, offset):
        def run():
            buffer = np.arange(10.0, 10.0 + buffer_size)  # values unlike their positions, so mix-ups show
            expected = torch.as_strided(torch.from_numpy(buffer), shape, strides, offset).numpy()
            got = as_strided(buffer.copy(), shape, strides, offset)
            expect_equal(got, expected, what=f"shape {shape}, strides {strides}, offset {offset}", atol=0, rtol=0)
        return run

    cases = [
        case(12, (3, 4), (4, 1), 0),  # a plain row-major matrix
        case(12, (4, 3), (1, 4), 0),  # its transpose: the same buffer, strides swapped
        case(7, (5, 3), (1, 1), 0),  # overlapping sliding windows
        case(12, (2, 3), (6, 2), 1),  # every other element, starting one in
        case(4, (3, 4), (0, 1), 0),  # a row repeated: stride 0 is how broadcasting is free
        case(24, (2, 3, 2), (12, 1, 3), 2),
        case(6, (), (), 5),  # a 0-d view of one element
    ]
    check("Exercise 1.3 (as_strided)", cases,
          hint="element index (i0, i1, ...) lives at buffer[offset + i0*strides[0] + i1*strides[1] + ...]; "
               "loop over every index with np.ndindex(*shape) and fill np.empty(shape, buffer.dtype)")


def check_unbroadcast(unbroadcast) -> None:
    """Exercise 1.4: sum an array of a broadcast result's shape back to the shape of one operand."""
    rng = np.random.default_rng(14)

    def case(shape, big_shape):
        def run():
            grad = rng.normal(size=big_shape)
            leaf = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
            leaf.expand(big_shape).backward(torch.from_numpy(grad))  # autograd sums the copies back
            got = unbroadcast(grad.copy(), shape)
            expect_equal(got, leaf.grad.numpy(), what=f"unbroadcast of {big_shape} to {shape}", atol=1e-12)
        return run

    cases = [case((3,), (4, 3)), case((3, 1), (2, 3, 4)), case((5, 1), (5, 6)), case((1, 3, 1), (2, 3, 4)),
             case((), (2, 3)), case((3, 4), (3, 4))]
    check("Exercise 1.4 (unbroadcast)", cases,
          hint="two kinds of dims to sum: the leading ones broadcasting added (grad.ndim - len(shape) of them), "
               "and the ones where shape has a 1 but grad does not; sum them with keepdims=True, then reshape "
               "to shape")
