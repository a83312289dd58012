"""Chapter 01's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import numpy as np
import pytest

from minillm.engine import Tensor
from minillm.engine import tensor as engine_tensor
from minillm.exercises import ch01, use
from exercise_helpers import stub, outputs


# --- 1.1 and 1.2 (build): permute and expand as stride arithmetic ----------------------------------


def permute_strides(shape, strides, dims):
    return tuple(shape[d] for d in dims), tuple(strides[d] for d in dims)


def expand_strides(shape, strides, sizes, stretch_stride=lambda old_stride: 0):
    lead = len(sizes) - len(shape)
    if lead < 0 or any(n < 0 for n in sizes[:lead]):
        raise ValueError(f"cannot expand {shape} to {sizes}")
    out_shape, out_strides = list(sizes[:lead]), [0] * lead
    for old, stride, new in zip(shape, strides, sizes[lead:]):
        if new in (-1, old):
            out_shape.append(old)
            out_strides.append(stride)
        elif old == 1 and new >= 0:
            out_shape.append(new)
            out_strides.append(stretch_stride(stride))
        else:
            raise ValueError(f"cannot expand {shape} to {sizes}")
    return tuple(out_shape), tuple(out_strides)


def fresh_row_major(shape, strides, dims):  # the strides of a copy, not of a view
    new_shape = tuple(shape[d] for d in dims)
    itemsize = min((abs(s) for s in strides if s), default=8)
    return new_shape, tuple(itemsize * math.prod(new_shape[k + 1:]) for k in range(len(new_shape)))


def inverse_permutation(shape, strides, dims):  # dims read the other way round
    inverse = tuple(int(i) for i in np.argsort(dims))
    return tuple(shape[d] for d in inverse), tuple(strides[d] for d in inverse)


def test_permute_strides_check(capsys):
    ch01.check_permute_strides(permute_strides)
    ch01.check_permute_strides(stub)
    ch01.check_permute_strides(lambda shape, strides, dims: (tuple(shape[d] for d in dims), strides))
    ch01.check_permute_strides(inverse_permutation)
    ch01.check_permute_strides(fresh_row_major)
    ch01.check_permute_strides(lambda shape, strides, dims: [list(p) for p in permute_strides(shape, strides, dims)])
    passed, stubbed, unpermuted, inverse, fresh, lists = outputs(capsys)
    assert passed == "Exercise 1.1 (permute as strides): passed ✓"
    assert stubbed.startswith("Exercise 1.1 (permute as strides): not attempted yet")
    assert unpermuted == ("Exercise 1.1 (permute as strides): not yet ✗ - case 1: permute_strides((3, 4), (32, 8), "
                          "dims=(1, 0)) for a (3, 4) array: expected strides (8, 32) (torch's view, in bytes), got (32, 8)")
    assert inverse == ("Exercise 1.1 (permute as strides): not yet ✗ - case 2: permute_strides((2, 3, 4), (96, 32, 8), "
                       "dims=(2, 0, 1)) for a (2, 3, 4) array: expected shape (4, 2, 3), got (3, 4, 2)")
    assert fresh.startswith("Exercise 1.1 (permute as strides): not yet ✗ - case 1: permute_strides((3, 4), (32, 8), "
                            "dims=(1, 0)) for a (3, 4) array: expected strides (8, 32) (torch's view, in bytes), "
                            "got (24, 8)")
    assert lists.endswith("case 1: permute_strides((3, 4), (32, 8), dims=(1, 0)) for a (3, 4) array should return a "
                          "pair (shape, strides), got list [[4, 3], [8, 32]]")


def test_expand_strides_check(capsys):
    ch01.check_expand_strides(expand_strides)
    ch01.check_expand_strides(stub)
    ch01.check_expand_strides(lambda *args: expand_strides(*args, stretch_stride=lambda old_stride: old_stride))
    ch01.check_expand_strides(lambda shape, strides, sizes: expand_strides(shape, strides, sizes[-len(shape):] if shape
                                                                           else (), ))
    ch01.check_expand_strides(lambda shape, strides, sizes: (tuple(np.broadcast_shapes(shape, tuple(abs(n) for n in sizes))),
                                                             (0,) * len(sizes)))
    passed, stubbed, stretched_keep_stride, no_new_dims, all_zero = outputs(capsys)
    assert passed == "Exercise 1.2 (expand as strides): passed ✓"
    assert "not attempted yet" in stubbed
    assert stretched_keep_stride == ("Exercise 1.2 (expand as strides): not yet ✗ - case 1: expand_strides((4, 1), "
                                     "(8, 8), sizes=(4, 5)) for a (4, 1) column: expected strides (8, 0) (torch's "
                                     "view, in bytes), got (8, 8)")
    assert no_new_dims.startswith("Exercise 1.2 (expand as strides): not yet ✗ - case 2: expand_strides((3, 4), "
                                  "(32, 8), sizes=(2, 3, 4)) for a (3, 4) array: expected shape (2, 3, 4), got (3, 4)")
    assert all_zero.startswith("Exercise 1.2 (expand as strides): not yet ✗ - case 1: expand_strides((4, 1), (8, 8), "
                               "sizes=(4, 5)) for a (4, 1) column: expected strides (8, 0) (torch's view, in bytes), "
                               "got (0, 0)")


def test_views_plugged_in_match_torch(capsys):
    with use(permute_strides=permute_strides, expand_strides=expand_strides):
        assert engine_tensor.permute_strides is permute_strides
        assert ch01.end_to_end_views()
    assert capsys.readouterr().out == (
        "attention's head split with your strides: views equal torch's (values bit for bit, strides, shared "
        "memory); scores within 2·γ_hs·Σ|q·k| of torch's: ✓\n")


def test_wrong_views_plugged_in_fail_end_to_end(capsys):
    with use(permute_strides=fresh_row_major, expand_strides=expand_strides):
        assert not ch01.end_to_end_views()
    with use(permute_strides=permute_strides,
             expand_strides=lambda *a: expand_strides(*a, stretch_stride=lambda old_stride: old_stride)):
        assert not ch01.end_to_end_views()
    fresh, stretched = capsys.readouterr().out.splitlines()
    assert fresh.endswith("✗ - heads: shape (2, 4, 5, 2), strides (40, 10, 2, 1) (elements); torch's "
                          "(2, 4, 5, 2), (40, 2, 8, 1)")
    assert stretched.endswith("✗ - your code raised ValueError: expand: the layout shape (2, 4, 5, 5), strides "
                              "(20, 20, 20, 4) reads bytes 0..176, outside the tensor's own 0..36")


def test_layout_outside_the_buffer_is_refused(capsys):
    too_far = lambda shape, strides, dims: (tuple(shape[d] for d in dims), tuple(10 * s for s in strides))  # noqa: E731
    with use(permute_strides=too_far):
        assert not ch01.end_to_end_views()
    assert "your code raised ValueError: transpose: the layout shape (2, 4, 5, 2), strides" in capsys.readouterr().out
    with use(permute_strides=too_far), pytest.raises(ValueError, match="outside the tensor's own"):
        Tensor(np.zeros((3, 4))).permute(1, 0)


def test_stub_plugged_in_is_skipped(capsys):
    with use(permute_strides=stub, expand_strides=expand_strides):
        ch01.end_to_end_views()
    assert capsys.readouterr().out.startswith("plug-in skipped: your permute_strides (exercise 1.1), expand_strides "
                                              "(exercise 1.2) is not written yet")


def test_plug_in_leaves_the_engine_unchanged():
    originals = engine_tensor.permute_strides, engine_tensor.expand_strides
    x = np.arange(24.0).reshape(2, 3, 4)

    def reference():
        return [Tensor(x).permute(2, 0, 1).data.copy(), Tensor(x[:, :1]).expand(5, 2, 3, 4).data.copy()]

    before = reference()
    with use(permute_strides=fresh_row_major, expand_strides=expand_strides):
        assert engine_tensor.permute_strides is fresh_row_major
    with pytest.raises(ZeroDivisionError):
        with use(permute_strides=permute_strides, expand_strides=expand_strides):
            1 / 0
    assert (engine_tensor.permute_strides, engine_tensor.expand_strides) == originals
    after = reference()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after))


# --- 1.3 broadcast shape --------------------------------------------------------------------------


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
    assert passed == "Exercise 1.3 (broadcast shape): passed ✓"
    assert stubbed.startswith("Exercise 1.3 (broadcast shape): not attempted yet")
    assert left_aligned == ("Exercise 1.3 (broadcast shape): not yet ✗ - case 2: broadcast_shape((5, 4), (4,)): "
                            "expected (5, 4), got (5,)")
    assert never_raises.startswith("Exercise 1.3 (broadcast shape): not yet ✗ - case 5: broadcast_shape((4, 3), "
                                   "(3, 4)) should raise ValueError")
    assert a_list.endswith("case 1: broadcast_shape((3, 1), (1, 4)) should return a tuple (like numpy's .shape "
                           "and .strides), got list [3, 4]")


# --- 1.4 contiguous strides -----------------------------------------------------------------------


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
    assert passed == "Exercise 1.4 (contiguous strides): passed ✓"
    assert "not attempted yet" in stubbed
    assert fortran == ("Exercise 1.4 (contiguous strides): not yet ✗ - case 1: contiguous_strides((3, 4), "
                       "itemsize=8): expected (32, 8) (numpy's strides), got (8, 24)")
    assert items.endswith("case 1: contiguous_strides((3, 4), itemsize=8): expected (32, 8) (numpy's strides), "
                          "got (4, 1)")
    assert off_by_one.endswith("got (96, 32)")


# --- 1.5 as_strided --------------------------------------------------------------------------------


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
    assert passed == passed_too == "Exercise 1.5 (as_strided): passed ✓"
    assert "not attempted yet" in stubbed
    assert no_offset.startswith("Exercise 1.5 (as_strided): not yet ✗ - case 4: shape (2, 3), strides (6, 2), "
                                "offset 1: first mismatch at index (0, 0): expected 11, got 10")
    assert row_major.startswith("Exercise 1.5 (as_strided): not yet ✗ - case 2: shape (4, 3), strides (1, 4), "
                                "offset 0: first mismatch at index (0, 1): expected 14, got 11")
    assert reversed_strides.startswith("Exercise 1.5 (as_strided): not yet ✗ - case 1: your code raised IndexError")


# --- 1.6 unbroadcast --------------------------------------------------------------------------------


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
    assert passed == "Exercise 1.6 (unbroadcast): passed ✓"
    assert "not attempted yet" in stubbed
    assert leading_only == ("Exercise 1.6 (unbroadcast): not yet ✗ - case 2: unbroadcast of (2, 3, 4) to (3, 1): "
                            "expected shape (3, 1), got shape (3, 4)")
    assert averaged.startswith("Exercise 1.6 (unbroadcast): not yet ✗ - case 1: unbroadcast of (4, 3) to (3,): "
                               "first mismatch at index (0,)")
    assert broadcast_again.startswith("Exercise 1.6 (unbroadcast): not yet ✗ - case 1: your code raised ValueError")
