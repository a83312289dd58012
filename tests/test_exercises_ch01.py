"""Chapter 01's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import numpy as np

from minillm.exercises import ch01
from exercise_helpers import stub, outputs


# --- 1.1 broadcast shape --------------------------------------------------------------------------


def broadcast_shape(a, b, check_sizes=True):
    ndim = max(len(a), len(b))
    a, b = (1,) * (ndim - len(a)) + tuple(a), (1,) * (ndim - len(b)) + tuple(b)
    if check_sizes and any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        raise ValueError(f"shapes {a} and {b} cannot be broadcast")
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def test_broadcast_shape_check(capsys):
    ch01.check_broadcast_shape(broadcast_shape)
    ch01.check_broadcast_shape(stub)
    ch01.check_broadcast_shape(lambda a, b: tuple(max(x, y) for x, y in zip(a, b)))  # aligned on the left
    ch01.check_broadcast_shape(lambda a, b: broadcast_shape(a, b, check_sizes=False))
    ch01.check_broadcast_shape(lambda a, b: list(broadcast_shape(a, b)))
    passed, stubbed, left_aligned, never_raises, a_list = outputs(capsys)
    assert passed == "Exercise 1.1 (broadcast shape): passed ✓"
    assert stubbed.startswith("Exercise 1.1 (broadcast shape): not attempted yet")
    assert left_aligned == ("Exercise 1.1 (broadcast shape): not yet ✗ - case 2: broadcast_shape((5, 4), (4,)): "
                            "expected (5, 4), got (5,)")
    assert never_raises.startswith("Exercise 1.1 (broadcast shape): not yet ✗ - case 5: broadcast_shape((4, 3), "
                                   "(3, 4)) should raise ValueError")
    assert a_list.endswith("case 1: broadcast_shape((3, 1), (1, 4)) should return a tuple (like numpy's .shape "
                           "and .strides), got list [3, 4]")


# --- 1.2 contiguous strides -----------------------------------------------------------------------


def contiguous_strides(shape, itemsize):
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def test_contiguous_strides_check(capsys):
    ch01.check_contiguous_strides(contiguous_strides)
    ch01.check_contiguous_strides(stub)
    ch01.check_contiguous_strides(lambda shape, n: contiguous_strides(shape[::-1], n)[::-1])  # column-major
    ch01.check_contiguous_strides(lambda shape, n: contiguous_strides(shape, 1))  # counted in items, not bytes
    ch01.check_contiguous_strides(lambda shape, n: tuple(n * math.prod(shape[k:]) for k in range(len(shape))))
    passed, stubbed, fortran, items, off_by_one = outputs(capsys)
    assert passed == "Exercise 1.2 (contiguous strides): passed ✓"
    assert "not attempted yet" in stubbed
    assert fortran == ("Exercise 1.2 (contiguous strides): not yet ✗ - case 1: contiguous_strides((3, 4), "
                       "itemsize=8): expected (32, 8) (numpy's strides), got (8, 24)")
    assert items.endswith("case 1: contiguous_strides((3, 4), itemsize=8): expected (32, 8) (numpy's strides), "
                          "got (4, 1)")
    assert off_by_one.endswith("got (96, 32)")


# --- 1.3 as_strided --------------------------------------------------------------------------------


def as_strided(buffer, shape, strides, offset=0):
    out = np.empty(shape, dtype=buffer.dtype)
    for index in np.ndindex(*shape):
        out[index] = buffer[offset + sum(i * s for i, s in zip(index, strides))]
    return out


def test_as_strided_check(capsys):
    ch01.check_as_strided(as_strided)
    ch01.check_as_strided(lambda buffer, shape, strides, offset=0:  # numpy's own view, strides turned into bytes
                          np.lib.stride_tricks.as_strided(buffer[offset:], shape,
                                                          [s * buffer.itemsize for s in strides]))
    ch01.check_as_strided(stub)
    ch01.check_as_strided(lambda buffer, shape, strides, offset=0: as_strided(buffer, shape, strides))
    ch01.check_as_strided(lambda buffer, shape, strides, offset=0:  # ignores strides: always row-major
                          buffer[offset:offset + math.prod(shape)].reshape(shape))
    ch01.check_as_strided(lambda buffer, shape, strides, offset=0: as_strided(buffer, shape, strides[::-1], offset))
    passed, passed_too, stubbed, no_offset, row_major, reversed_strides = outputs(capsys)
    assert passed == passed_too == "Exercise 1.3 (as_strided): passed ✓"
    assert "not attempted yet" in stubbed
    assert no_offset.startswith("Exercise 1.3 (as_strided): not yet ✗ - case 4: shape (2, 3), strides (6, 2), "
                                "offset 1: first mismatch at index (0, 0): expected 11, got 10")
    assert row_major.startswith("Exercise 1.3 (as_strided): not yet ✗ - case 2: shape (4, 3), strides (1, 4), "
                                "offset 0: first mismatch at index (0, 1): expected 14, got 11")
    assert reversed_strides.startswith("Exercise 1.3 (as_strided): not yet ✗ - case 1: your code raised IndexError")


# --- 1.4 unbroadcast --------------------------------------------------------------------------------


def unbroadcast(grad, shape):
    extra = grad.ndim - len(shape)
    stretched = tuple(extra + k for k, n in enumerate(shape) if n == 1 and grad.shape[extra + k] != 1)
    return grad.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)


def test_unbroadcast_check(capsys):
    ch01.check_unbroadcast(unbroadcast)
    ch01.check_unbroadcast(stub)
    ch01.check_unbroadcast(lambda grad, shape: grad.sum(axis=tuple(range(grad.ndim - len(shape)))))  # leading only
    ch01.check_unbroadcast(lambda grad, shape: unbroadcast(grad, shape) / (grad.size // max(1, math.prod(shape))))
    ch01.check_unbroadcast(lambda grad, shape: np.broadcast_to(grad, shape))
    passed, stubbed, leading_only, averaged, broadcast_again = outputs(capsys)
    assert passed == "Exercise 1.4 (unbroadcast): passed ✓"
    assert "not attempted yet" in stubbed
    assert leading_only == ("Exercise 1.4 (unbroadcast): not yet ✗ - case 2: unbroadcast of (2, 3, 4) to (3, 1): "
                            "expected shape (3, 1), got shape (3, 4)")
    assert averaged.startswith("Exercise 1.4 (unbroadcast): not yet ✗ - case 1: unbroadcast of (4, 3) to (3,): "
                               "first mismatch at index (0,)")
    assert broadcast_again.startswith("Exercise 1.4 (unbroadcast): not yet ✗ - case 1: your code raised ValueError")
