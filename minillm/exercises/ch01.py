"""Checks for chapter 01's exercises: numpy and torch judge every answer.

The exercises work on shapes and strides alone (plain tuples and numpy arrays). The two build exercises compute
the layout of a view (`permute`, `expand`), judged by the strides torch gives the same view; plugged into
`minillm.engine.tensor`, they make the engine's views, and `end_to_end_views` checks attention's head split against
torch. The practice ones: broadcasting is judged by `np.broadcast_shapes`, strides by the arrays numpy allocates,
strided views by `torch.as_strided`, and summing a broadcast back by `torch.autograd` through `expand`.
"""

import numpy as np
import torch

from minillm.exercises import Mismatch, check, exercise, expect_equal, verdict

_DTYPE_OF_ITEMSIZE = {1: np.int8, 2: np.float16, 4: np.float32, 8: np.float64}


def _as_shape(got, call: str) -> tuple:
    """A learner's shape answer as a tuple of ints, or `Mismatch` saying what came back instead."""
    if not isinstance(got, tuple):
        raise Mismatch(f"{call} should return a tuple (like numpy's .shape and .strides), got {type(got).__name__} "
                       f"{got!r}")
    return tuple(int(n) for n in got)


# --- 1.1 and 1.2 (build): views as stride arithmetic -------------------------------------------------


def _layout(got, call: str) -> tuple[tuple, tuple]:
    """A learner's (shape, strides) answer as two tuples of ints, or `Mismatch` saying what came back instead."""
    if not (isinstance(got, tuple) and len(got) == 2):
        raise Mismatch(f"{call} should return a pair (shape, strides), got {type(got).__name__} {got!r:.80}")
    return _as_shape(got[0], f"{call}'s shape"), _as_shape(got[1], f"{call}'s strides")


def _torch_layout(view: torch.Tensor, itemsize: int) -> tuple[tuple, tuple]:
    """torch counts strides in elements; numpy (and so the engine) in bytes."""
    return tuple(view.shape), tuple(s * itemsize for s in view.stride())


def _expect_layout(got, expected, call: str) -> None:
    """Same shape, and the same stride wherever the size is not 1 (nothing steps along a size-1 dim)."""
    shape, strides = _layout(got, call)
    if shape != expected[0]:
        raise Mismatch(f"{call}: expected shape {expected[0]}, got {shape}")
    if len(strides) != len(shape) or any(a != b for a, b, n in zip(strides, expected[1], shape) if n != 1):
        raise Mismatch(f"{call}: expected strides {expected[1]} (torch's view, in bytes), got {strides}")


def _bases() -> dict[str, np.ndarray]:
    """Inputs with awkward layouts: contiguous, sliced with a step, transposed, and 0-d."""
    grid = np.arange(24.0).reshape(2, 3, 4)
    return {"a (3, 4) array": np.arange(12.0).reshape(3, 4), "a (2, 3, 4) array": grid,
            "a (2, 1, 3) array": np.arange(6.0).reshape(2, 1, 3), "x[:, ::2] (strides (32, 16))": grid[0][:, ::2],
            "x.T (strides (8, 32))": grid[0].T, "a (2, 4, 5, 2) array": np.zeros((2, 4, 5, 2), np.float32),
            "a 0-d array": np.array(7.0), "a (4, 1) column": np.arange(4.0).reshape(4, 1)}


@exercise("1.1", "permute as strides", kind="build", component="permute_strides",
          replaces="minillm.engine.tensor:permute_strides", hides=("minillm.engine.tensor.permute_strides",))
def check_permute_strides(permute_strides) -> None:
    """Exercise 1.1: the (shape, strides) of `permute(dims)`, judged by the view torch makes."""
    bases = _bases()

    def case(name, dims):
        def run():
            base = bases[name]
            expected = _torch_layout(torch.from_numpy(base).permute(dims), base.itemsize)
            call = f"permute_strides({base.shape}, {base.strides}, dims={dims}) for {name}"
            _expect_layout(permute_strides(base.shape, base.strides, dims), expected, call)
        return run

    cases = [case("a (3, 4) array", (1, 0)), case("a (2, 3, 4) array", (2, 0, 1)), case("a (2, 3, 4) array", (1, 2, 0)),
             case("a (2, 3, 4) array", (0, 1, 2)), case("a (2, 1, 3) array", (1, 2, 0)),
             case("x[:, ::2] (strides (32, 16))", (1, 0)), case("x.T (strides (8, 32))", (1, 0)),
             case("a (2, 4, 5, 2) array", (0, 2, 1, 3)), case("a 0-d array", ())]
    check("1.1", cases,
          hint="a view moves no element: each dim of the result is one of the input's dims, taken along with "
               "its size AND its stride",
          more="for every position i of the result, look up which input dim dims[i] names, and copy that dim's "
               "size and stride. Do not compute fresh row-major strides: those would describe a copy, and the "
               "view must read the input's own buffer")


@exercise("1.2", "expand as strides", kind="build", component="expand_strides",
          replaces="minillm.engine.tensor:expand_strides", hides=("minillm.engine.tensor.expand_strides",))
def check_expand_strides(expand_strides) -> None:
    """Exercise 1.2: the (shape, strides) of `expand(sizes)`, or ValueError where torch refuses."""
    bases = _bases()

    def case(name, sizes):
        def run():
            base = bases[name]
            call = f"expand_strides({base.shape}, {base.strides}, sizes={sizes}) for {name}"
            try:
                expected = _torch_layout(torch.from_numpy(base).expand(sizes), base.itemsize)
            except RuntimeError:
                expected = None
            try:
                got = expand_strides(base.shape, base.strides, sizes)
            except ValueError:
                if expected is None:
                    return
                raise Mismatch(f"{call}: expected {expected}, but your code raised ValueError") from None
            if expected is None:
                raise Mismatch(f"{call} should raise ValueError (torch refuses this expand), got {got!r}")
            _expect_layout(got, expected, call)
        return run

    cases = [case("a (4, 1) column", (4, 5)), case("a (3, 4) array", (2, 3, 4)), case("a (2, 1, 3) array", (5, 2, 4, 3)),
             case("a (2, 1, 3) array", (-1, 6, -1)), case("a 0-d array", (2, 3)), case("x.T (strides (8, 32))", (2, 4, 3)),
             case("a (3, 4) array", (3, 5)), case("a (3, 4) array", (4,)), case("a (3, 4) array", (-1, 3, 4)),
             case("a (4, 1) column", (1, 4, 1))]
    check("1.2", cases,
          hint="expand never copies: a stretched element is read again and again, so stepping along a stretched "
               "(or new) dim must not move through memory at all",
          more="align sizes with the input's dims on the right, as broadcasting does; the extra dims on the left are "
               "new. A new dim, or a size-1 dim stretched to n, gets stride 0; -1 or the same size keeps the dim as it "
               "is; any other size change raises ValueError (so does -1 for a new dim)")


def end_to_end_views() -> bool:
    """Attention's head split through the engine's views (and so through whatever layout functions are plugged in).

    `heads = x.reshape(B, T, nh, hs).transpose(1, 2)`, its transpose for the keys, `x.permute(2, 0, 1)`, and a
    causal mask (T, T) and a padding mask (B, 1, 1, T) expanded over batch and heads must be the views torch makes: same values (bitwise: a view reads the same
    float32 bytes, no arithmetic), same strides, sharing x's memory when torch's do. The scores `heads @ keysᵀ`
    come from numpy's and torch's matmuls, different kernels, so they are held to the float32 rounding bound of a
    dot product of length hs computed twice: |ours - torch's| <= 2·γ_hs·Σ|q·k|, γ_K = K·u/(1 - K·u), u = 2⁻²⁴.
    """
    from minillm.engine import Tensor
    from minillm.engine import tensor as engine_tensor

    B, T, C, nh = 2, 5, 8, 4
    hs = C // nh
    x = np.random.default_rng(2).normal(size=(B, T, C)).astype(np.float32)
    causal = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)  # (T, T): -inf above the diagonal
    padding = np.zeros((B, 1, 1, T), dtype=np.float32)  # (B, 1, 1, T): -inf on each sequence's padded keys
    padding[0, ..., -2:] = -np.inf

    def views(x, causal, padding):
        heads = x.reshape(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        keys_t = heads.transpose(-2, -1)  # (B, nh, hs, T)
        return {"heads": heads, "keysᵀ": keys_t, "x.permute(2, 0, 1)": x.permute(2, 0, 1), "x[0].T": x[0].T,
                "causal.expand(B, nh, T, T)": causal.expand(B, nh, T, T),
                "padding.expand(B, nh, T, T)": padding.expand(B, nh, T, T), "scores": heads @ keys_t}

    theirs = views(torch.from_numpy(x.copy()), torch.from_numpy(causal), torch.from_numpy(padding))
    yours = any(getattr(engine_tensor, name).__module__ != engine_tensor.__name__
                for name in ("permute_strides", "expand_strides"))
    whose = "your" if yours else "minillm's"
    claim = (f"attention's head split with {whose} strides: views equal torch's (values bit for bit, strides, "
             "shared memory); scores within 2·γ_hs·Σ|q·k| of torch's")
    try:
        ours = views(Tensor(x), Tensor(causal), Tensor(padding))
    except NotImplementedError:
        raise  # an unwritten stub: use() prints "plug-in skipped"
    except Exception as crash:
        return verdict(False, claim, f"your code raised {type(crash).__name__}: {crash}")
    for name, view in ours.items():
        if name == "scores":
            continue
        theirs_view = theirs[name]
        strides = tuple(s // view.data.itemsize for s in view.data.strides)
        if view.shape != tuple(theirs_view.shape) or any(
                a != b for a, b, n in zip(strides, theirs_view.stride(), view.shape) if n != 1):
            return verdict(False, claim, f"{name}: shape {view.shape}, strides {strides} (elements); torch's "
                                         f"{tuple(theirs_view.shape)}, {theirs_view.stride()}")
        source = {"causal": causal, "padding": padding}.get(name.split(".")[0], x)
        if not np.shares_memory(view.data, source):
            return verdict(False, claim, f"{name} is a copy; torch's is a view")
        if not np.array_equal(view.data, theirs_view.numpy()):
            index = tuple(int(i) for i in np.argwhere(view.data != theirs_view.numpy())[0])
            return verdict(False, claim, f"{name}: first mismatch at index {index}: expected "
                                         f"{theirs_view.numpy()[index]:.6g}, got {view.data[index]:.6g}")
    u = 2.0**-24
    gamma = hs * u / (1 - hs * u)
    q = ours["heads"].data.astype(np.float64)
    bound = 2 * gamma * (np.abs(q) @ np.abs(np.swapaxes(q, -1, -2)))  # (B, nh, T, T)
    error = np.abs(ours["scores"].data.astype(np.float64) - theirs["scores"].numpy().astype(np.float64))
    if (error > bound).any():
        index = tuple(int(i) for i in np.argwhere(error > bound)[0])
        return verdict(False, claim, f"scores at index {index}: |Δ| = {error[index]:.3g} exceeds {bound[index]:.3g}")
    return verdict(True, claim)


# --- practice: shapes and strides by hand ----------------------------------------------------------


@exercise("1.3", "broadcast shape")
def check_broadcast_shape(broadcast_shape) -> None:
    """Exercise 1.3: the shape two shapes broadcast to, or a ValueError when they cannot."""

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
    check("1.3", [case(a, b) for a, b in pairs],
          hint="section 5's three rules, in order: shapes align on the right; per dim, sizes must be equal or one "
               "must be 1; a 1 stretches",
          more="make both shapes the same length first, by padding the shorter one with 1s on the side where "
               "dims are missing (the left), then decide each dim on its own and raise ValueError on a conflict")


@exercise("1.4", "contiguous strides")
def check_contiguous_strides(contiguous_strides) -> None:
    """Exercise 1.4: the byte strides of a C-contiguous (row-major) array of a given shape and item size."""

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
    check("1.4", [case(s, n) for s, n in cases],
          hint="in row-major order the last dim moves fastest: one step along it moves one element; one step along "
               "any other dim skips everything the dims to its right hold",
          more="work from the last dim to the first, keeping a running step in bytes: it starts at itemsize and is "
               "multiplied by each dim's size once that dim's stride is written down")


@exercise("1.5", "as_strided")
def check_as_strided(as_strided) -> None:
    """Exercise 1.5: read a strided view out of a flat buffer, like `torch.as_strided` (strides in elements)."""

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
    check("1.5", cases,
          hint="section 1's formula, with strides in elements: an element's position in the buffer is the offset "
               "plus, for each dim, its index times its stride",
          more="allocate the result with the requested shape and the buffer's dtype, then visit every index of "
               "that shape (np.ndindex walks them all, including the single index of a 0-d shape) and copy one "
               "element each")


@exercise("1.6", "unbroadcast")
def check_unbroadcast(unbroadcast) -> None:
    """Exercise 1.6: sum an array of a broadcast result's shape back to the shape of one operand."""
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
    check("1.6", cases,
          hint="every copy broadcasting made sends its gradient back to the one element it copied: sum over the "
               "dims that broadcasting created",
          more="two kinds of dims were created: the leading ones that broadcasting added in front, and the ones "
               "where shape has a 1 but grad does not. Sum over both (keepdims helps), then bring the result to "
               "exactly shape")
