"""What the engine tests share: hypothesis strategies, the table of ops under test, and two checks.

- Strategies draw shapes (including 0-d and broadcast pairs) and float64 arrays whose values keep every
  op in its smooth domain (log, sqrt and division only ever see numbers in [0.5, 2]).
- `TENSOR_CASES` and `FUNCTIONAL_CASES` pair each engine op with its torch twin and an input strategy.
  test_tensor.py / test_functional.py compare every case with torch.autograd, test_autograd.py checks
  every case against central differences, so adding an op here tests it three ways.
- `assert_matches_torch` and `gradcheck` are those two checks (chapter 02 builds the same gradcheck).
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as TF
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minillm.engine import Tensor, cat, stack, where
from minillm.engine import functional as F

MAX_SIDE = 4


def shapes(min_dims=0, max_dims=3, min_side=1):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=MAX_SIDE)


def broadcastable_shapes(num_shapes=2, max_dims=3):
    """Shapes that broadcast together, e.g. ((3, 1), (2, 1, 4)): size-1 and missing dims included."""
    return hnp.mutually_broadcastable_shapes(num_shapes=num_shapes, min_dims=0, max_dims=max_dims,
                                             min_side=1, max_side=MAX_SIDE).map(lambda s: s.input_shapes)


@st.composite
def arrays(draw, shape, low=-2.0, high=2.0):
    """float64 values uniform in [low, high] from a drawn seed.

    A continuous distribution (rather than hypothesis' element-by-element draws, which love repeating
    one value) keeps ties and exact zeros away, so max and relu have one well-defined gradient.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).uniform(low, high, size=shape)


POSITIVE = (0.5, 2.0)


def masks(shape):
    """Boolean arrays of `shape`, each element True with probability 1/2."""
    return st.integers(0, 2**32 - 1).map(lambda seed: np.asarray(np.random.default_rng(seed).random(shape) < 0.5))


# ---- input strategies: each draws (arrays, params) for `case.ours(*tensors, **params)` ----------------

def unary(low=-2.0, high=2.0, **shape_kwargs):
    return shapes(**shape_kwargs).flatmap(lambda s: arrays(s, low, high)).map(lambda x: ((x,), {}))


@st.composite
def binary(draw, b_range=(-2.0, 2.0)):
    a_shape, b_shape = draw(broadcastable_shapes())
    return (draw(arrays(a_shape)), draw(arrays(b_shape, *b_range))), {}


@st.composite
def matmul_inputs(draw):
    """Every matmul form: (m, k) @ (k, n), broadcast batches, and 1-D operands on either side."""
    m, k, n = (draw(st.integers(1, MAX_SIDE)) for _ in range(3))
    batch_a, batch_b = draw(broadcastable_shapes(max_dims=2))
    left_vector, right_vector = draw(st.booleans()), draw(st.booleans())
    a_shape = (k,) if left_vector else batch_a + (m, k)
    b_shape = (k,) if right_vector else batch_b + (k, n)
    return (draw(arrays(a_shape)), draw(arrays(b_shape))), {}


def dims_of(shape):
    """None, an int (maybe negative) or a tuple of distinct dims of `shape`."""
    ndim = len(shape)
    return st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                     st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple))


@st.composite
def reduction(draw, min_side=1, with_correction=False):
    shape = draw(shapes(min_dims=1, min_side=min_side))
    params = {"dim": draw(dims_of(shape)), "keepdim": draw(st.booleans())}
    if with_correction:
        params["correction"] = draw(st.integers(0, 2))  # min_side=3 keeps count - correction > 0
    return (draw(arrays(shape)),), params


@st.composite
def max_inputs(draw):
    shape = draw(shapes(min_dims=1))
    dim = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    return (draw(arrays(shape)),), {"dim": dim, "keepdim": dim is not None and draw(st.booleans())}


@st.composite
def reshape_inputs(draw):
    shape = draw(shapes())
    size = int(np.prod(shape))
    target = draw(st.sampled_from([(-1,), tuple(reversed(shape)), (1,) + shape, (size, 1), (-1, 1)]))
    return (draw(arrays(shape)),), {"shape": target}


@st.composite
def transpose_inputs(draw):
    shape = draw(shapes(min_dims=1))
    d0, d1 = draw(st.integers(-len(shape), len(shape) - 1)), draw(st.integers(-len(shape), len(shape) - 1))
    return (draw(arrays(shape)),), {"dim0": d0, "dim1": d1}


@st.composite
def permute_inputs(draw):
    shape = draw(shapes(min_dims=1))
    return (draw(arrays(shape)),), {"dims": tuple(draw(st.permutations(range(len(shape)))))}


@st.composite
def unsqueeze_inputs(draw):
    shape = draw(shapes())
    return (draw(arrays(shape)),), {"dim": draw(st.integers(-len(shape) - 1, len(shape)))}


@st.composite
def squeeze_inputs(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=2))  # plenty of 1s
    dim = draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    return (draw(arrays(shape)),), {"dim": dim}


@st.composite
def expand_inputs(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=2))
    sizes = tuple(draw(st.integers(1, 3)) if n == 1 else draw(st.sampled_from([n, -1])) for n in shape)
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    return (draw(arrays(shape)),), {"sizes": lead + sizes}


@st.composite
def basic_index_inputs(draw):
    """Ints (negative too), slices with steps, None and Ellipsis: numpy's and torch's basic indexing."""
    shape = draw(shapes(min_dims=1))
    key = []
    for n in shape[: draw(st.integers(1, len(shape)))]:
        key.append(draw(st.one_of(
            st.integers(-n, n - 1),
            st.builds(slice, st.integers(-n, n) | st.none(), st.integers(-n, n) | st.none(), st.integers(1, 2)),
        )))
    if draw(st.booleans()):
        key.insert(draw(st.integers(0, len(key))), None)
    if draw(st.booleans()):
        key.append(Ellipsis)
    return (draw(arrays(shape)),), {"key": tuple(key)}


@st.composite
def integer_index_inputs(draw):
    """An integer array (repeats and negative indices likely) on dim 0 or dim 1."""
    shape = draw(shapes(min_dims=1))
    dim = draw(st.integers(0, len(shape) - 1))
    n = shape[dim]
    index = np.array(draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=6)))
    return (draw(arrays(shape)),), {"key": (slice(None),) * dim + (index,)}


@st.composite
def mask_index_inputs(draw):
    """A boolean mask over the leading dims (possibly all of them)."""
    shape = draw(shapes(min_dims=1))
    mask_shape = shape[: draw(st.integers(1, len(shape)))]
    return (draw(arrays(shape)),), {"key": draw(masks(mask_shape))}


@st.composite
def masked_fill_inputs(draw):
    shape = draw(shapes(min_dims=1))
    mask_shape = tuple(draw(st.sampled_from([n, 1])) for n in shape)[draw(st.integers(0, len(shape))):]
    value = draw(st.sampled_from([0.0, -1e9, 3.5]))
    return (draw(arrays(shape)),), {"mask": draw(masks(mask_shape)), "value": value}


@st.composite
def where_inputs(draw):
    cond_shape, a_shape, b_shape = draw(broadcastable_shapes(num_shapes=3))
    return (draw(arrays(a_shape)), draw(arrays(b_shape))), {"cond": draw(masks(cond_shape))}


@st.composite
def cat_inputs(draw):
    shape = draw(shapes(min_dims=1))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    count = draw(st.integers(1, 3))
    parts = []
    for _ in range(count):
        part_shape = list(shape)
        part_shape[dim] = draw(st.integers(1, MAX_SIDE))
        parts.append(draw(arrays(tuple(part_shape))))
    return tuple(parts), {"dim": dim}


@st.composite
def stack_inputs(draw):
    shape = draw(shapes())
    dim = draw(st.integers(-len(shape) - 1, len(shape)))
    return tuple(draw(arrays(shape)) for _ in range(draw(st.integers(1, 3)))), {"dim": dim}


# ---- functional inputs -------------------------------------------------------------------------------

@st.composite
def softmax_inputs(draw):
    shape = draw(shapes(min_dims=1))
    return (draw(arrays(shape, -5.0, 5.0)),), {"dim": draw(st.integers(-len(shape), len(shape) - 1))}


@st.composite
def cross_entropy_inputs(draw):
    """Targets with some rows ignored (-100), but never all: a mean over no rows is nan."""
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    targets = [draw(st.integers(0, c - 1))] + draw(st.lists(st.integers(0, c - 1) | st.just(-100),
                                                            min_size=n - 1, max_size=n - 1))
    reduction_ = draw(st.sampled_from(["mean", "sum", "none"]))
    return (draw(arrays((n, c), -4.0, 4.0)),), {"targets": np.array(targets), "reduction": reduction_}


@st.composite
def layer_norm_inputs(draw):
    shape = draw(shapes(min_dims=1, min_side=2))
    normalized = shape[len(shape) - draw(st.integers(1, len(shape))):]
    affine = draw(st.booleans())
    inputs = (draw(arrays(shape)),) + ((draw(arrays(normalized)), draw(arrays(normalized))) if affine else ())
    return inputs, {"normalized_shape": normalized}


@st.composite
def linear_inputs(draw):
    batch = draw(shapes(min_dims=0, max_dims=2))
    n_in, n_out = draw(st.integers(1, MAX_SIDE)), draw(st.integers(1, MAX_SIDE))
    inputs = (draw(arrays(batch + (n_in,))), draw(arrays((n_out, n_in))))
    if draw(st.booleans()):
        inputs += (draw(arrays((n_out,))),)
    return inputs, {}


@st.composite
def embedding_inputs(draw):
    num, dim = draw(st.integers(1, 6)), draw(st.integers(1, MAX_SIDE))
    id_shape = draw(shapes(min_dims=1, max_dims=2))
    ids = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, num, size=id_shape)
    return (draw(arrays((num, dim))),), {"ids": ids}


# ---- the cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    ours: Callable  # (*engine tensors, **params) -> Tensor
    theirs: Callable  # (*torch tensors, **params) -> torch.Tensor
    inputs: st.SearchStrategy  # -> (tuple of float64 arrays, params dict)

    def __repr__(self):
        return self.name


def _torch_key(key):
    parts = key if isinstance(key, tuple) else (key,)
    return tuple(torch.from_numpy(k) if isinstance(k, np.ndarray) else k for k in parts)


def _our_key(key):
    parts = key if isinstance(key, tuple) else (key,)
    return tuple(Tensor(k) if isinstance(k, np.ndarray) else k for k in parts)


TENSOR_CASES = [
    Case("add", lambda a, b: a + b, lambda a, b: a + b, binary()),
    Case("sub", lambda a, b: a - b, lambda a, b: a - b, binary()),
    Case("mul", lambda a, b: a * b, lambda a, b: a * b, binary()),
    Case("div", lambda a, b: a / b, lambda a, b: a / b, binary(b_range=POSITIVE)),
    Case("neg", lambda x: -x, lambda x: -x, unary()),
    Case("scalar_operands", lambda x: (2.5 - x) * 3 / (x * x + 1) + 1 - 0.5 / (x * x + 1) + x / 4,
         lambda x: (2.5 - x) * 3 / (x * x + 1) + 1 - 0.5 / (x * x + 1) + x / 4, unary()),
    Case("pow", lambda x, exponent: x**exponent, lambda x, exponent: x**exponent,
         st.tuples(unary(*POSITIVE), st.sampled_from([2, 3, 0.5, -1.5, 0])).map(
             lambda t: (t[0][0], {"exponent": t[1]}))),
    Case("matmul", lambda a, b: a @ b, lambda a, b: a @ b, matmul_inputs()),
    Case("exp", lambda x: x.exp(), lambda x: x.exp(), unary()),
    Case("log", lambda x: x.log(), lambda x: x.log(), unary(*POSITIVE)),
    Case("sqrt", lambda x: x.sqrt(), lambda x: x.sqrt(), unary(*POSITIVE)),
    Case("tanh", lambda x: x.tanh(), lambda x: x.tanh(), unary()),
    Case("sigmoid", lambda x: x.sigmoid(), lambda x: x.sigmoid(), unary(-8.0, 8.0)),
    Case("relu", lambda x: x.relu(), lambda x: x.relu(), unary()),
    Case("sum", lambda x, dim, keepdim: x.sum(dim, keepdim),
         lambda x, dim, keepdim: x.sum(dim=dim, keepdim=keepdim), reduction()),
    Case("mean", lambda x, dim, keepdim: x.mean(dim, keepdim),
         lambda x, dim, keepdim: x.mean(dim=dim, keepdim=keepdim), reduction()),
    Case("var", lambda x, **kw: x.var(**kw), lambda x, **kw: x.var(**kw), reduction(3, with_correction=True)),
    Case("max", lambda x, dim, keepdim: x.max(dim, keepdim),
         lambda x, dim, keepdim: x.max() if dim is None else x.max(dim, keepdim).values, max_inputs()),
    Case("reshape", lambda x, shape: x.reshape(shape), lambda x, shape: x.reshape(shape), reshape_inputs()),
    Case("transpose", lambda x, **kw: x.transpose(**kw), lambda x, **kw: x.transpose(**kw), transpose_inputs()),
    Case("permute", lambda x, dims: x.permute(*dims), lambda x, dims: x.permute(*dims), permute_inputs()),
    Case("T", lambda x: x.T, lambda x: x.T, unary(min_dims=2, max_dims=2)),
    Case("unsqueeze", lambda x, dim: x.unsqueeze(dim), lambda x, dim: x.unsqueeze(dim), unsqueeze_inputs()),
    Case("squeeze", lambda x, dim: x.squeeze(dim),
         lambda x, dim: x.squeeze() if dim is None else x.squeeze(dim), squeeze_inputs()),
    Case("expand", lambda x, sizes: x.expand(*sizes), lambda x, sizes: x.expand(*sizes), expand_inputs()),
    Case("index_basic", lambda x, key: x[key], lambda x, key: x[key], basic_index_inputs()),
    Case("index_integer_array", lambda x, key: x[_our_key(key)], lambda x, key: x[_torch_key(key)],
         integer_index_inputs()),
    Case("index_bool_mask", lambda x, key: x[Tensor(key)], lambda x, key: x[torch.from_numpy(key)],
         mask_index_inputs()),
    Case("masked_fill", lambda x, mask, value: x.masked_fill(Tensor(mask), value),
         lambda x, mask, value: x.masked_fill(torch.from_numpy(mask), value), masked_fill_inputs()),
    Case("where", lambda a, b, cond: where(Tensor(cond), a, b),
         lambda a, b, cond: torch.where(torch.from_numpy(cond), a, b), where_inputs()),
    Case("cat", lambda *xs, dim: cat(xs, dim), lambda *xs, dim: torch.cat(xs, dim), cat_inputs()),
    Case("stack", lambda *xs, dim: stack(xs, dim), lambda *xs, dim: torch.stack(xs, dim), stack_inputs()),
]

FUNCTIONAL_CASES = [
    Case("F.softmax", F.softmax, TF.softmax, softmax_inputs()),
    Case("F.log_softmax", F.log_softmax, TF.log_softmax, softmax_inputs()),
    Case("F.cross_entropy", lambda x, targets, **kw: F.cross_entropy(x, Tensor(targets), **kw),
         lambda x, targets, **kw: TF.cross_entropy(x, torch.from_numpy(targets), **kw), cross_entropy_inputs()),
    Case("F.gelu", F.gelu, lambda x: TF.gelu(x, approximate="tanh"), unary(-4.0, 4.0)),
    Case("F.layer_norm", lambda x, *affine, normalized_shape: F.layer_norm(x, normalized_shape, *affine),
         lambda x, *affine, normalized_shape: TF.layer_norm(x, normalized_shape, *affine), layer_norm_inputs()),
    Case("F.linear", F.linear, TF.linear, linear_inputs()),
    Case("F.embedding", lambda w, ids: F.embedding(Tensor(ids), w),
         lambda w, ids: TF.embedding(torch.from_numpy(ids), w), embedding_inputs()),
    Case("F.relu", F.relu, TF.relu, unary()),
    Case("F.tanh", F.tanh, torch.tanh, unary()),
]


# ---- the two checks ----------------------------------------------------------------------------------

def upstream_for(shape, seed=1):
    """A random d(loss)/d(out), so every output element's gradient path is exercised."""
    return np.random.default_rng(seed).standard_normal(shape)


def assert_matches_torch(case, inputs, params, rtol=1e-10, atol=1e-12):
    """Forward value, output dtype and every input gradient of `case` agree with torch.autograd."""
    ours = [Tensor(a.copy(), requires_grad=True) for a in inputs]
    theirs = [torch.tensor(a, requires_grad=True) for a in inputs]
    out, ref = case.ours(*ours, **params), case.theirs(*theirs, **params)
    assert out.shape == tuple(ref.shape), (
        f"{case.name}{params}: output shape {out.shape} but torch gives {tuple(ref.shape)}")
    assert out.dtype == np.float64, f"{case.name}: float64 inputs gave a {out.dtype} output"
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=rtol, atol=atol,
                               err_msg=f"{case.name}{params}: forward value differs from torch")
    upstream = upstream_for(out.shape)
    out.backward(upstream)
    ref.backward(torch.from_numpy(upstream))
    for i, (x, t) in enumerate(zip(ours, theirs)):
        assert x.grad is not None, f"{case.name}: input {i} got no gradient; does backward return one per parent?"
        assert x.grad.shape == x.shape, f"{case.name}: grad of input {i} has shape {x.grad.shape}, not {x.shape}"
        np.testing.assert_allclose(
            x.grad, t.grad.numpy(), rtol=rtol, atol=atol,
            err_msg=f"{case.name}{params}: gradient of input {i} differs from torch.autograd; check the op's "
                    f"backward and how broadcast dims are summed back")


def assert_keeps_float32(case, inputs, params):
    """float32 in, float32 out and float32 gradients: Python scalars and constants must not upcast."""
    xs = [Tensor(a.astype(np.float32), requires_grad=True) for a in inputs]
    out = case.ours(*xs, **params)
    assert out.dtype == np.float32, f"{case.name}: float32 inputs gave a {out.dtype} output (an upcast)"
    out.backward(upstream_for(out.shape).astype(np.float32))
    for i, x in enumerate(xs):
        assert x.grad.dtype == np.float32, f"{case.name}: gradient of input {i} is {x.grad.dtype}, not float32"


def gradcheck(fn, inputs, eps=1e-6, rtol=1e-5, atol=1e-6, name="fn"):
    """Compare the engine's gradients of sum(fn(*inputs) * upstream) with central differences.

    (f(x + eps) - f(x - eps)) / 2eps is off by O(eps²) from the true derivative, and float64 rounding
    adds ~1e-16 / eps, so 1e-6 is a good step and a few 1e-6 of disagreement is expected.
    """
    xs = [Tensor(a.copy(), requires_grad=True) for a in inputs]
    out = fn(*xs)
    upstream = upstream_for(out.shape)
    out.backward(upstream)
    for i, x in enumerate(xs):
        numeric = np.zeros_like(x.data)
        for idx in np.ndindex(x.shape):
            original = x.data[idx]
            x.data[idx] = original + eps
            plus = fn(*xs).data.copy()  # copied: a view (reshape, slicing) would follow the next nudge
            x.data[idx] = original - eps
            minus = fn(*xs).data.copy()
            x.data[idx] = original
            # Subtract before weighting, so huge constant outputs (a -1e9 mask fill) cancel exactly.
            numeric[idx] = ((plus - minus) * upstream).sum() / (2 * eps)
        np.testing.assert_allclose(
            x.grad, numeric, rtol=rtol, atol=atol,
            err_msg=f"{name}: gradient of input {i} disagrees with central differences; the op's backward "
                    f"formula is wrong")
