"""A numpy array that remembers how it was made, so it can be differentiated in reverse.

Chapter 01 teaches the forward half (dtypes, broadcasting, views, indexing); chapter 02 the backward half
(the recorded graph, the topological walk, gradient accumulation). Names and semantics follow
`torch.Tensor` and `torch.autograd`, so every result can be checked against torch.

Every differentiable op is written the same way, micrograd style: compute the forward value with numpy,
then hand `Tensor._op` the parents and a `backward(grad_out)` closure that returns one gradient per parent.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np

DIFFERENTIABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ALLOWED_DTYPES = DIFFERENTIABLE_DTYPES + (np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.bool_))
_ALLOWED_NAMES = ", ".join(str(d) for d in ALLOWED_DTYPES)

_grad_enabled = True


def is_grad_enabled() -> bool:
    """True unless inside `no_grad()`, like `torch.is_grad_enabled`."""
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Record no graph inside this block (a context manager or a decorator), like `torch.no_grad`."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def _freed_graph(grad):
    raise RuntimeError(
        "Trying to backward through the graph a second time: its intermediate values were freed by the "
        "first .backward(). Specify retain_graph=True on the first call to backward through it again."
    )


def _unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum `grad` over the dimensions broadcasting added or stretched, so it has `shape` again."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    stretched = tuple(i + extra for i, n in enumerate(shape) if n == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)


def _dims(dim, ndim: int, op: str):
    """Normalise `dim` (None, an int or a tuple, negatives allowed) to a tuple of axes, or None for all."""
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    for d in dims:
        if not -ndim <= d < ndim:
            raise IndexError(f"{op}: dim {d} is out of range for a tensor with {ndim} dims "
                             f"(allowed {-ndim}..{ndim - 1})")
    return tuple(d % ndim for d in dims)


def _sizes(args: tuple) -> tuple:
    """torch accepts both `x.reshape(2, 3)` and `x.reshape((2, 3))`."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _operand(value, like: Tensor) -> Tensor:
    """Lift the other operand of a binary op to a Tensor that does not require grad.

    A Python number takes numpy's weak-scalar dtype, so `float32_tensor * 0.5` stays float32 (as in torch).
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (bool, int, float)):
        return Tensor(np.asarray(value, dtype=np.result_type(like.dtype, value)))
    return Tensor(value)


def _binary(op: str, ufunc, a: Tensor, b: Tensor) -> np.ndarray:
    try:
        return ufunc(a.data, b.data)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast") from None


class Tensor:
    """An n-d array (`.data`) plus what autograd needs: `.grad`, `.requires_grad` and the op that made it."""

    # Makes numpy hand `array + tensor` over to Tensor.__radd__ instead of looping over the tensor.
    __array_ufunc__ = None

    def __init__(self, data, requires_grad: bool = False):
        if isinstance(data, Tensor):
            data = data.data
        elif isinstance(data, (np.ndarray, np.generic)):
            data = np.asarray(data)
        else:
            array = np.asarray(data)
            if array.dtype.kind in "OUS":  # None, a string, a dict...: numpy wraps it as an object, not a number
                raise TypeError(f"Tensor: data must be a number, a nested list of numbers, a numpy array or a "
                                f"Tensor, got {type(data).__name__} {data!r:.60}")
            data = array
            if data.dtype == np.float64:  # Python floats become torch's default dtype
                data = data.astype(np.float32)
        if data.dtype not in ALLOWED_DTYPES:
            raise TypeError(f"Tensor: dtype {data.dtype} is not supported; allowed dtypes: {_ALLOWED_NAMES}")
        if requires_grad and data.dtype not in DIFFERENTIABLE_DTYPES:
            raise TypeError(f"Tensor: only float32/float64 tensors can require gradients, got {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self._parents = ()
        self._backward = None  # None marks a leaf; an op's closure otherwise
        self._name = None

    @staticmethod
    def _op(data: np.ndarray, parents: tuple, backward: Callable, name: str) -> Tensor:
        """Wrap an op's result; record `parents` and `backward` only if some parent needs a gradient.

        `backward(grad_out)` returns one gradient per parent (an array or None), each of the parent's
        shape or of a shape broadcasting stretched it to; the engine sums broadcast dimensions back.
        """
        out = Tensor(data)
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
            out._backward = backward
            out._name = name
        return out

    # ---- what a tensor is -------------------------------------------------------------------------

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        body = np.array2string(self.data, separator=", ", prefix="tensor(")
        extras = "" if self.dtype in (np.float32, np.int64, np.bool_) else f", dtype={self.dtype}"
        if self._name is not None:
            extras += f", grad_fn=<{self._name}>"
        elif self.requires_grad:
            extras += ", requires_grad=True"
        return f"tensor({body}{extras})"

    def item(self):
        return self.data.item()

    def numpy(self) -> np.ndarray:
        """The underlying array (shared, not copied)."""
        return self.data

    def detach(self) -> Tensor:
        """The same data, cut off from the graph."""
        return Tensor(self.data)

    # ---- arithmetic: numpy broadcasting forward, `_unbroadcast` (in backward()) sums it back ----

    def __add__(self, other):
        a, b = self, _operand(other, self)
        return Tensor._op(_binary("add", np.add, a, b), (a, b), lambda g: (g, g), "add")

    def __sub__(self, other):
        a, b = self, _operand(other, self)
        out = _binary("sub", np.subtract, a, b)
        return Tensor._op(out, (a, b), lambda g: (g, -g if b.requires_grad else None), "sub")

    def __mul__(self, other):
        a, b = self, _operand(other, self)

        def backward(g):
            return (g * b.data if a.requires_grad else None,
                    g * a.data if b.requires_grad else None)

        return Tensor._op(_binary("mul", np.multiply, a, b), (a, b), backward, "mul")

    def __truediv__(self, other):
        a, b = self, _operand(other, self)
        out = _binary("div", np.true_divide, a, b)

        def backward(g):
            return (g / b.data if a.requires_grad else None,
                    -g * out / b.data if b.requires_grad else None)  # d(a/b)/db = -a/b² = -out/b

        return Tensor._op(out, (a, b), backward, "div")

    def __radd__(self, other):
        return _operand(other, self) + self

    def __rsub__(self, other):
        return _operand(other, self) - self

    def __rmul__(self, other):
        return _operand(other, self) * self

    def __rtruediv__(self, other):
        return _operand(other, self) / self

    def __neg__(self):
        return Tensor._op(-self.data, (self,), lambda g: (-g,), "neg")

    def __pow__(self, exponent):
        if not isinstance(exponent, (int, float)):
            raise TypeError(f"pow: the exponent must be a Python int or float, got {type(exponent).__name__}")
        x = self.data

        def backward(g):
            if exponent == 0:  # torch defines this gradient as 0, even at x = 0
                return (np.zeros_like(g),)
            return (g * (exponent * x ** (exponent - 1)),)

        return Tensor._op(x**exponent, (self,), backward, "pow")

    def __matmul__(self, other):
        a, b = self, _operand(other, self)
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: both operands need at least 1 dim, got shapes {a.shape} and {b.shape}")
        inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
        if a.shape[-1] != inner_b:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are not aligned ({a.shape[-1]} != {inner_b})")
        try:
            out = a.data @ b.data
        except ValueError:
            raise ValueError(f"matmul: batch dims of shapes {a.shape} and {b.shape} cannot be broadcast") from None

        def backward(g):
            # A 1-D operand acts as a (1, k) row or a (k, 1) column; give g the matching unit dim back.
            a2 = a.data[None, :] if a.ndim == 1 else a.data
            b2 = b.data[:, None] if b.ndim == 1 else b.data
            if b.ndim == 1:
                g = np.expand_dims(g, -1)
            if a.ndim == 1:
                g = np.expand_dims(g, -2)
            ga = g @ np.swapaxes(b2, -1, -2) if a.requires_grad else None  # (..., m, k)
            gb = np.swapaxes(a2, -1, -2) @ g if b.requires_grad else None  # (..., k, n)
            if a.ndim == 1 and ga is not None:
                ga = ga[..., 0, :]
            if b.ndim == 1 and gb is not None:
                gb = gb[..., 0]
            return ga, gb

        return Tensor._op(out, (a, b), backward, "matmul")

    def __rmatmul__(self, other):
        return _operand(other, self) @ self

    # ---- elementwise functions --------------------------------------------------------------------

    def exp(self):
        out = np.exp(self.data)
        return Tensor._op(out, (self,), lambda g: (g * out,), "exp")

    def log(self):
        x = self.data
        return Tensor._op(np.log(x), (self,), lambda g: (g / x,), "log")

    def sqrt(self):
        out = np.sqrt(self.data)
        return Tensor._op(out, (self,), lambda g: (g * 0.5 / out,), "sqrt")

    def tanh(self):
        out = np.tanh(self.data)
        return Tensor._op(out, (self,), lambda g: (g * (1 - out * out),), "tanh")

    def sigmoid(self):
        # exp(-|x|) never overflows; the two branches are the same function rearranged.
        x = self.data
        e = np.exp(-np.abs(x))
        out = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return Tensor._op(out, (self,), lambda g: (g * out * (1 - out),), "sigmoid")

    def relu(self):
        out = np.maximum(self.data, 0)
        return Tensor._op(out, (self,), lambda g: (g * (out > 0),), "relu")

    # ---- reductions -------------------------------------------------------------------------------

    def sum(self, dim=None, keepdim: bool = False):
        axes = _dims(dim, self.ndim, "sum")
        out = np.asarray(self.data.sum(axis=axes, keepdims=keepdim))

        def backward(g):
            if axes is not None and not keepdim:
                g = np.expand_dims(g, axes)
            return (np.broadcast_to(g, self.shape),)

        return Tensor._op(out, (self,), backward, "sum")

    def mean(self, dim=None, keepdim: bool = False):
        _dims(dim, self.ndim, "mean")  # so a bad dim is reported as mean's, not sum's
        total = self.sum(dim, keepdim)
        return total / (self.data.size // max(total.data.size, 1))  # elements summed into each output

    def var(self, dim=None, keepdim: bool = False, correction: int = 1):
        """Variance with Bessel's `correction` (torch's default 1 is unbiased), built from ops we have."""
        _dims(dim, self.ndim, "var")
        centered = self - self.mean(dim, keepdim=True)
        squares = (centered * centered).sum(dim, keepdim)
        return squares / (self.data.size // max(squares.data.size, 1) - correction)

    def max(self, dim=None, keepdim: bool = False):
        """The largest values (not torch's (values, indices) pair); the gradient goes to the arg-max.

        Over the whole tensor, ties share the gradient equally, as in torch.
        """
        x = self.data
        if dim is None:
            out = np.asarray(x.max())

            def backward(g):
                winners = x == out
                return (winners * (g / winners.sum()),)

            return Tensor._op(out, (self,), backward, "max")
        if not isinstance(dim, int):
            raise TypeError(f"max: dim must be an int or None, got {type(dim).__name__}")
        (axis,) = _dims(dim, self.ndim, "max")
        index = np.expand_dims(x.argmax(axis=axis), axis)
        out = np.take_along_axis(x, index, axis=axis)

        def backward(g):
            grad = np.zeros_like(x)
            np.put_along_axis(grad, index, g if keepdim else np.expand_dims(g, axis), axis=axis)
            return (grad,)

        return Tensor._op(out if keepdim else out.squeeze(axis), (self,), backward, "max")

    # ---- shapes and views -------------------------------------------------------------------------

    def reshape(self, *shape):
        shape = _sizes(shape)
        try:
            out = self.data.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {self.shape} "
                             f"({self.data.size} elements) into shape {shape}") from None
        return Tensor._op(out, (self,), lambda g: (g.reshape(self.shape),), "reshape")

    view = reshape

    def transpose(self, dim0: int, dim1: int):
        d0, d1 = _dims((dim0, dim1), self.ndim, "transpose")
        axes = list(range(self.ndim))
        axes[d0], axes[d1] = d1, d0  # a transpose is the permutation that swaps two dims
        out = _strided_view(self.data, permute_strides(self.shape, self.data.strides, tuple(axes)), "transpose")
        return Tensor._op(out, (self,), lambda g: (np.swapaxes(g, d0, d1),), "transpose")

    def permute(self, *dims):
        dims = _sizes(dims)
        axes = _dims(dims, self.ndim, "permute")
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"permute: dims {dims} are not a permutation of the {self.ndim} dims of {self.shape}")
        out = _strided_view(self.data, permute_strides(self.shape, self.data.strides, axes), "permute")
        return Tensor._op(out, (self,), lambda g: (np.transpose(g, np.argsort(axes)),), "permute")

    @property
    def T(self):
        """All dims reversed: the usual transpose for a 2-D tensor."""
        return self.permute(*reversed(range(self.ndim)))

    def unsqueeze(self, dim: int):
        (axis,) = _dims(dim, self.ndim + 1, "unsqueeze")
        out = np.expand_dims(self.data, axis)
        return Tensor._op(out, (self,), lambda g: (g.reshape(self.shape),), "unsqueeze")

    def squeeze(self, dim=None):
        axes = _dims(dim, self.ndim, "squeeze")
        if axes is not None:  # like torch, a named dim that is not 1 is left alone
            axes = tuple(d for d in axes if self.shape[d] == 1)
        out = np.squeeze(self.data, axes)
        return Tensor._op(out, (self,), lambda g: (g.reshape(self.shape),), "squeeze")

    def expand(self, *sizes):
        """A broadcast view (-1 keeps a size); backward's `_unbroadcast` sums the copies back."""
        sizes = _sizes(sizes)
        try:
            layout = expand_strides(self.shape, self.data.strides, sizes)
        except ValueError:
            raise ValueError(f"expand: shape {self.shape} cannot be expanded to {sizes}") from None
        out = _strided_view(self.data, layout, "expand", writeable=False)  # read-only, like np.broadcast_to
        return Tensor._op(out, (self,), lambda g: (g,), "expand")

    def __getitem__(self, key):
        key = tuple(_index(k) for k in key) if isinstance(key, tuple) else _index(key)
        parts = key if isinstance(key, tuple) else (key,)
        advanced = any(isinstance(k, np.ndarray) for k in parts)
        out = self.data[key]

        def backward(g):
            grad = np.zeros_like(self.data)
            if advanced:  # an index may repeat: np.add.at adds every copy, plain `+=` would keep one
                np.add.at(grad, key, g)
            else:
                grad[key] = g
            return (grad,)

        return Tensor._op(out, (self,), backward, "index")

    def masked_fill(self, mask, value):
        """Put `value` (a number) wherever `mask` (bool, broadcastable to self) is True."""
        mask = mask.data if isinstance(mask, Tensor) else np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"masked_fill: mask must be bool, got {mask.dtype}")
        try:
            fits = np.broadcast_shapes(mask.shape, self.shape) == self.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"masked_fill: mask shape {mask.shape} cannot be broadcast to tensor shape {self.shape}")
        value = value.item() if isinstance(value, Tensor) else value
        out = np.where(mask, value, self.data)
        return Tensor._op(out, (self,), lambda g: (np.where(mask, 0, g),), "masked_fill")

    # ---- autograd ---------------------------------------------------------------------------------

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` that requires grad, like torch.

        Checks and seeds the output's gradient, then hands the walk to `backpropagate` (looked up at call
        time: chapter 02's build exercise swaps in the learner's walk). Frees the graph unless `retain_graph=True`.
        """
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad and has no graph to walk")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"grad can be implicitly created only for scalar outputs; this one has shape "
                                   f"{self.shape}, so pass backward(grad) with that shape")
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward: grad shape {grad.shape} does not match tensor shape {self.shape}")

        backpropagate(self, grad, retain_graph)


def backpropagate(root: Tensor, grad: np.ndarray, retain_graph: bool = False) -> None:
    """Walk the graph behind `root` once in reverse topological order, adding gradients into the leaves' `.grad`.

    `grad` is d(output)/d(root), already of root's shape. Each node's gradient is complete (summed over all its
    uses) before its closure runs. Chapter 02 teaches it; the learner writes it (exercise 2.1) and the result
    matches `torch.autograd`'s engine (also in which tensors get a `.grad`: leaves that require it, nothing else).
    """
    # Depth-first post-order, iterative so long chains cannot hit Python's recursion limit.
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if p.requires_grad)

    grads = {id(root): grad}
    for node in reversed(order):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if node.is_leaf:
            # Copy once so .grad never aliases another tensor's gradient; accumulate in place after.
            if node.grad is None:
                node.grad = np.array(g, dtype=node.dtype)
            else:
                node.grad += g
            continue
        for parent, pg in zip(node._parents, node._backward(g)):
            if pg is None or not parent.requires_grad:
                continue
            pg = _unbroadcast(pg, parent.shape)
            if pg.dtype != parent.dtype:  # a float32 operand mixed with float64 gets a float32 grad
                pg = pg.astype(parent.dtype)
            key = id(parent)
            grads[key] = grads[key] + pg if key in grads else pg
        if not retain_graph:
            node._backward, node._parents = _freed_graph, ()


def permute_strides(shape: tuple, strides: tuple, dims: tuple) -> tuple[tuple, tuple]:
    """The layout of `permute(dims)`: dim i of the view is dim `dims[i]` of the input, with its size and stride.

    Chapter 01's build exercise 1.1; the view shares the input's memory, as torch's does (nothing moves).
    """
    return tuple(shape[d] for d in dims), tuple(strides[d] for d in dims)


def expand_strides(shape: tuple, strides: tuple, sizes: tuple) -> tuple[tuple, tuple]:
    """The layout of `expand(sizes)`, like torch: sizes align on the right, -1 keeps an existing dim's size.

    A new leading dim or a size-1 dim stretched to n gets stride 0: every step re-reads the same element, so
    broadcasting costs no memory. Any other size change raises ValueError. Chapter 01's build exercise 1.2.
    """
    lead = len(sizes) - len(shape)
    if lead < 0:
        raise ValueError(f"expand: {len(sizes)} sizes cannot cover a tensor with {len(shape)} dims")
    out_shape, out_strides = list(sizes[:lead]), [0] * lead
    if any(n < 0 for n in out_shape):
        raise ValueError(f"expand: a new leading dim needs a size, got {sizes[:lead]}")
    for old, stride, new in zip(shape, strides, sizes[lead:]):
        if new in (-1, old):
            out_shape.append(old)
            out_strides.append(stride)
        elif old == 1 and new >= 0:
            out_shape.append(new)
            out_strides.append(0)
        else:
            raise ValueError(f"expand: a dim of size {old} cannot be expanded to {new} (only size 1 stretches)")
    return tuple(out_shape), tuple(out_strides)


def _strided_view(data: np.ndarray, layout, op: str, writeable: bool = True) -> np.ndarray:
    """`data`'s memory read through a (shape, strides) `layout`, after checking the view reads only `data`'s bytes.

    The layout comes from `permute_strides`/`expand_strides`, which a learner may swap (chapter 01): a stride that
    stepped outside the buffer would read whatever memory lies there, so it is refused instead.
    """
    shape, strides = (tuple(int(n) for n in part) for part in layout)
    if len(shape) != len(strides):
        raise ValueError(f"{op}: the layout has {len(shape)} sizes but {len(strides)} strides")

    def extent(sizes, steps):  # lowest and highest byte offset the layout reaches from the first element
        return (sum(min(0, (n - 1) * s) for n, s in zip(sizes, steps)),
                sum(max(0, (n - 1) * s) for n, s in zip(sizes, steps)))

    low, high = extent(shape, strides)
    data_low, data_high = extent(data.shape, data.strides) if data.size else (0, -1)
    if 0 not in shape and not data_low <= low <= high <= data_high:
        raise ValueError(f"{op}: the layout shape {shape}, strides {strides} reads bytes {low}..{high}, outside the "
                         f"tensor's own {data_low}..{data_high}")
    return np.lib.stride_tricks.as_strided(data, shape, strides, writeable=writeable)


def _index(key):
    """An index part as numpy understands it: a Tensor or list becomes an array."""
    if isinstance(key, Tensor):
        return key.data
    if isinstance(key, list):
        return np.asarray(key)
    return key


def where(condition, input, other) -> Tensor:
    """`input` where `condition` is True, else `other` (tensors or numbers, broadcast), like `torch.where`."""
    cond = condition.data if isinstance(condition, Tensor) else np.asarray(condition)
    if cond.dtype != np.bool_:
        raise TypeError(f"where: condition must be bool, got {cond.dtype}")
    if not isinstance(input, Tensor):
        input = _operand(input, other) if isinstance(other, Tensor) else Tensor(input)
    other = _operand(other, input)
    try:
        out = np.where(cond, input.data, other.data)
    except ValueError:
        raise ValueError(f"where: shapes {cond.shape}, {input.shape} and {other.shape} cannot be broadcast") from None

    def backward(g):
        return (np.where(cond, g, 0) if input.requires_grad else None,
                np.where(cond, 0, g) if other.requires_grad else None)

    return Tensor._op(out, (input, other), backward, "where")


def cat(tensors, dim: int = 0) -> Tensor:
    """Join tensors along an existing `dim`, like `torch.cat`."""
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    (axis,) = _dims(dim, tensors[0].ndim, "cat")
    try:
        out = np.concatenate([t.data for t in tensors], axis=axis)
    except ValueError:
        shapes = ", ".join(str(t.shape) for t in tensors)
        raise ValueError(f"cat: shapes {shapes} must match except in dim {dim}") from None
    ends = np.cumsum([t.shape[axis] for t in tensors])[:-1]
    return Tensor._op(out, tensors, lambda g: tuple(np.split(g, ends, axis=axis)), "cat")


def stack(tensors, dim: int = 0) -> Tensor:
    """Join equally shaped tensors along a new `dim`, like `torch.stack`."""
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError("stack: expected a non-empty sequence of tensors")
    if len({t.shape for t in tensors}) > 1:
        shapes = ", ".join(str(t.shape) for t in tensors)
        raise ValueError(f"stack: all tensors must have the same shape, got {shapes}")
    (axis,) = _dims(dim, tensors[0].ndim + 1, "stack")
    out = np.stack([t.data for t in tensors], axis=axis)
    return Tensor._op(out, tensors, lambda g: tuple(np.moveaxis(g, axis, 0)), "stack")
