"""Checks for chapter 02's exercises: torch.autograd judges every gradient.

Each check builds the same computation in torch (float64), runs `backward` with the same upstream gradient
the learner receives, and compares the learner's answer with torch's `.grad`. Exercise 2.1 is the chapter's
build exercise: the learner's backward walk replaces `minillm.engine.tensor.backpropagate`, and
`end_to_end_backpropagate` trains nothing but compares a residual MLP's gradients with torch's.
"""

import warnings

import numpy as np
import torch

from minillm.exercises import Mismatch, check, exercise, expect_equal, first_mismatch, verdict


def _torch_grads(fn, inputs: list[np.ndarray], grad_out: np.ndarray) -> list[np.ndarray]:
    """Gradients of `fn(*inputs)` against each input, given the upstream gradient `grad_out`, from torch."""
    leaves = [torch.tensor(x, requires_grad=True) for x in inputs]
    fn(*leaves).backward(torch.from_numpy(grad_out))
    return [leaf.grad.numpy() for leaf in leaves]


def _copies(*arrays):
    # The learner gets copies, so an answer that writes into its inputs cannot spoil the reference.
    return tuple(a.copy() for a in arrays)


# --- 2.1 (build): the backward walk -----------------------------------------------------------------


def _grad_of(tensor):
    """A tensor's `.grad` as numpy (None stays None); torch warns when a non-leaf's `.grad` is read, we know."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        grad = tensor.grad
    return None if grad is None else getattr(grad, "numpy", lambda: grad)()


def _compare_grads(what: str, ours: dict, theirs: dict) -> None:
    """`ours`/`theirs`: name -> engine tensor / torch tensor. Values, dtypes and who has a `.grad` must agree."""
    for name, tensor in ours.items():
        got, expected = _grad_of(tensor), _grad_of(theirs[name])
        if expected is None:
            if got is not None:
                kind = "an intermediate result" if not tensor.is_leaf else "a constant (requires_grad=False)"
                raise Mismatch(f"{what}: {name} is {kind}, so its .grad should stay None (as in torch), "
                               f"got an array of shape {np.shape(got)}")
            continue
        expect_equal(got, expected, what=f"{what}: {name}.grad", atol=1e-12)
        if got.dtype != expected.dtype:
            raise Mismatch(f"{what}: {name}.grad: expected dtype {expected.dtype} (the leaf's own), got {got.dtype}")


def _walk_case(what, build, arrays: dict, backpropagate, calls=1, retain_graph=False):
    """Build the same graph on engine and torch leaves, walk it `calls` times, compare every tensor's `.grad`.

    `arrays`: leaf name -> values; `build(*leaves) -> (y, {name: other tensor to compare})`. A second walk
    of a freed graph must raise RuntimeError, as torch's does.
    """
    from minillm.engine import Tensor

    def run(make_leaf, walk):
        leaves = {name: make_leaf(a) for name, a in arrays.items()}
        out, named = build(*leaves.values())
        seed = np.random.default_rng(0).normal(size=out.shape)
        outcomes = []
        for _ in range(calls):
            try:
                walk(out, seed)
                outcomes.append("completed")
            except (NotImplementedError, RecursionError):  # RuntimeErrors too, but not a freed graph's
                raise
            except RuntimeError as error:
                outcomes.append(f"raised RuntimeError ({error})")
        return {**leaves, "y": out, **named}, outcomes

    theirs, expected_outcomes = run(
        lambda a: torch.tensor(a, requires_grad=True),
        lambda out, seed: out.backward(torch.from_numpy(seed).to(out.dtype), retain_graph=retain_graph))
    ours, outcomes = run(
        lambda a: Tensor(np.array(a), requires_grad=True),
        lambda out, seed: backpropagate(out, seed.astype(out.dtype), retain_graph))
    for call, (got, expected) in enumerate(zip(outcomes, expected_outcomes), start=1):
        if got.split(" (")[0] != expected.split(" (")[0]:
            why = " (a walk frees the graph unless retain_graph=True)" if call > 1 else ""
            raise Mismatch(f"{what}: on walk {call} (retain_graph={retain_graph}) torch's {expected.split(' (')[0]}, "
                           f"yours {got}{why}")
    _compare_grads(what, ours, theirs)


@exercise("2.1", "the backward walk", kind="build", component="backpropagate",
          replaces="minillm.engine.tensor:backpropagate",
          hides=("Tensor.backward", "minillm.engine.tensor.backpropagate"))
def check_backpropagate(backpropagate) -> None:
    """Exercise 2.1: `backpropagate(root, grad, retain_graph)` fills the leaves' `.grad` exactly as torch does."""
    from minillm.engine import Tensor

    rng = np.random.default_rng(21)
    normal = lambda *shape: rng.normal(size=shape)  # noqa: E731

    def neuron(x, w, b):
        return (w * x + b).tanh(), {}

    def two_paths(x):  # a = exp(x) reaches y directly and through tanh
        a = x.exp()
        return a * a.tanh(), {"a = exp(x)": a}

    def constants(x):
        c = _constant_like(x, np.array([0.5, -1.0, 2.0]))
        h = x + c
        return h * h, {"c": c, "h": h}

    def broadcast(a, bias, column):
        return (a + bias) * column, {}

    def mixed_dtypes(small, big):
        return small * big, {}

    def shared_gradient(x, w):  # add hands the same gradient array to both parents
        return x + w, {}

    def leaf_root(x):
        return x, {}

    def chain(x):  # far deeper than Python's recursion limit of about 1000 calls
        for _ in range(3000):
            x = x * 1.0001
        return x, {}

    cases = [
        lambda: _walk_case("the neuron tanh(w·x + b)", neuron, {"x": normal(3), "w": normal(3), "b": normal()},
                           backpropagate),
        lambda: _walk_case("a value used on two paths (y = a·tanh(a), a = exp(x))", two_paths, {"x": normal(4)},
                           backpropagate),
        lambda: _walk_case("a constant and an intermediate result (y = h·h, h = x + c)", constants,
                           {"x": normal(3)}, backpropagate),
        lambda: _walk_case("broadcasting (a (2, 4, 3) + bias (3,)) · column (4, 1)", broadcast,
                           {"a": normal(2, 4, 3), "bias": normal(3), "column": normal(4, 1)}, backpropagate),
        lambda: _walk_case("a float32 leaf times a float64 leaf", mixed_dtypes,
                           {"small": normal(3).astype(np.float32), "big": normal(3)}, backpropagate),
        lambda: _walk_case("two walks with retain_graph=True (y = x + w)", shared_gradient,
                           {"x": normal(2, 3), "w": normal(2, 3)}, backpropagate, calls=2, retain_graph=True),
        lambda: _walk_case("two walks without retain_graph", neuron, {"x": normal(3), "w": normal(3), "b": normal()},
                           backpropagate, calls=2),
        lambda: _walk_case("the root is a leaf itself", leaf_root, {"x": normal(2, 2)}, backpropagate),
        lambda: _walk_case("a chain of 3000 ops", chain, {"x": normal(3)}, backpropagate),
    ]
    check("2.1", cases,
          hint="a node may pass its gradient on only once every node that used it has added its share (reverse "
               "topological order); only leaves that require a gradient get a .grad, and it is added, not replaced",
          more="first list the nodes depth-first, each after all of its parents (an explicit stack, not "
               "recursion), then walk that list backwards keeping one pending gradient per node (keyed by id). "
               "Each gradient a closure returns is skipped if None or its parent needs none, else summed back "
               "to the parent's shape, cast to its dtype and added. A leaf's first .grad must be its own copy. "
               "Unless retain_graph, free each node after its closure ran, as the spec says.")


def _constant_like(x, values):
    """A constant of x's kind (engine Tensor or torch tensor) holding `values`, not requiring grad."""
    if isinstance(x, torch.Tensor):
        return torch.from_numpy(values)
    from minillm.engine import Tensor

    return Tensor(values)


def _residual_mlp(lib, params, x, targets):
    """The chapter's residual MLP, written once for both libraries (their operators are spelled alike):
    z = tanh(x w1 + b1), h = z + tanh(z w2 + b2), loss = cross_entropy(h w3 + b3) + 0.01 Σ w1².
    `z` is used twice (the residual path), so a walk out of topological order loses part of its gradient."""
    w1, b1, w2, b2, w3, b3 = params
    z = (x @ w1 + b1).tanh()  # (N, H)
    h = z + (z @ w2 + b2).tanh()  # (N, H)
    logits = h @ w3 + b3  # (N, C)
    return lib.cross_entropy(logits, targets) + 0.01 * (w1 * w1).sum()


def end_to_end_backpropagate() -> bool:
    """Gradients of a residual MLP through `Tensor.backward` (and so through whatever walk is plugged in) vs torch.

    Two batches, each its own `loss.backward()`, so the leaves accumulate. Both sides run in float64 with
    different matmul kernels (numpy vs torch), so the claim is a tolerance, not bitwise: every gradient entry
    within 1e-10 of torch's (the values are O(1); float64 rounding here is ~1e-15).
    """
    from minillm.engine import Tensor
    from minillm.engine import functional as F
    from minillm.engine import tensor as engine_tensor

    rng = np.random.default_rng(2)
    shapes = {"w1": (5, 8), "b1": (8,), "w2": (8, 8), "b2": (8,), "w3": (8, 4), "b3": (4,)}
    values = {name: rng.normal(scale=0.5, size=shape) for name, shape in shapes.items()}
    batches = [(rng.normal(size=(6, 5)), rng.integers(0, 4, size=6)) for _ in range(2)]

    torch_params = [torch.tensor(v, requires_grad=True) for v in values.values()]
    for x, targets in batches:
        _residual_mlp(torch.nn.functional, torch_params, torch.from_numpy(x), torch.from_numpy(targets)).backward()

    walk = "your" if engine_tensor.backpropagate.__module__ != engine_tensor.__name__ else "minillm's"
    claim = f"residual MLP gradients with {walk} backward walk match torch.autograd (float64, |Δ| ≤ 1e-10)"
    params = [Tensor(v.copy(), requires_grad=True) for v in values.values()]
    try:
        for x, targets in batches:
            _residual_mlp(F, params, Tensor(x), targets).backward()
    except NotImplementedError:
        raise  # an unwritten stub: use() prints "plug-in skipped"
    except Exception as crash:
        return verdict(False, claim, f"your code raised {type(crash).__name__}: {crash}")
    for name, ours, theirs in zip(values, params, torch_params):
        problem = first_mismatch(ours.grad, theirs.grad.numpy(), atol=1e-10, rtol=0)
        if problem is not None:
            return verdict(False, claim, f"{name}.grad: {problem}")
    return verdict(True, claim)


# --- practice: one op's backward at a time ---------------------------------------------------------


@exercise("2.2", "tanh backward")
def check_tanh_backward(tanh_backward) -> None:
    """Exercise 2.2: the gradient of y = tanh(x) with respect to x, given dL/dy."""
    rng = np.random.default_rng(21)

    def case(x):
        def run():
            grad_out = rng.normal(size=x.shape)
            (expected,) = _torch_grads(torch.tanh, [x], grad_out)
            got = tanh_backward(*_copies(x, grad_out))
            expect_equal(got, expected, what=f"gradient for x of shape {x.shape}", atol=1e-12)
        return run

    cases = [case(rng.normal(size=5)), case(rng.normal(scale=2.0, size=(3, 4))),
             case(np.array([-20.0, -0.5, 0.0, 3.0])), case(rng.normal(size=(2, 3, 5)))]
    check("2.2", cases,
          hint="the chain rule: tanh's local slope times grad_out, elementwise; section 1 writes that slope "
               "with tanh's output",
          more="you are given x, not y: compute y = tanh(x) first. The slope is 1 minus a square - the square of "
               "y, not of x")


@exercise("2.3", "matmul backward")
def check_matmul_backward(matmul_backward) -> None:
    """Exercise 2.3: both gradients of c = a @ b, including a `b` shared by a batch of `a`s."""
    rng = np.random.default_rng(22)

    def case(a_shape, b_shape):
        def run():
            a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
            grad_out = rng.normal(size=(a @ b).shape)
            expected_a, expected_b = _torch_grads(torch.matmul, [a, b], grad_out)
            got = matmul_backward(*_copies(a, b, grad_out))
            if not (isinstance(got, tuple) and len(got) == 2):
                raise Mismatch(f"expected a tuple (grad_a, grad_b), got {type(got).__name__}")
            what = f"a {a_shape} @ b {b_shape}"
            expect_equal(got[0], expected_a, what=f"grad_a for {what}", atol=1e-12)
            expect_equal(got[1], expected_b, what=f"grad_b for {what}", atol=1e-12)
        return run

    cases = [case((3, 4), (4, 5)), case((1, 6), (6, 1)), case((2, 3, 4), (2, 4, 5)), case((2, 3, 4), (4, 5))]
    check("2.3", cases,
          hint="each gradient has its own operand's shape; of the products of grad_out with the other operand "
               "(plain or transposed), only one has that shape (section 7)",
          more="in a batch, transpose only the last two axes (np.swapaxes). When one 2-D b served every matrix "
               "of the batch, it was used once per batch element: its gradient adds up those uses, so it has b's "
               "shape again")


@exercise("2.4", "softmax backward")
def check_softmax_backward(softmax_backward) -> None:
    """Exercise 2.4: the gradient of y = softmax(x) over the last axis, from y and dL/dy alone."""
    rng = np.random.default_rng(23)

    def case(x):
        def run():
            grad_out = rng.normal(size=x.shape)
            (expected,) = _torch_grads(lambda t: torch.softmax(t, dim=-1), [x], grad_out)
            y = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
            got = softmax_backward(*_copies(y, grad_out))
            expect_equal(got, expected, what=f"gradient for x of shape {x.shape}", atol=1e-12)
        return run

    cases = [case(rng.normal(size=5)), case(rng.normal(size=(3, 7))), case(rng.normal(size=(2, 3, 4))),
             case(rng.normal(scale=10.0, size=(2, 6)))]
    check("2.4", cases,
          hint="every output of a row depends on every input of that row, so the Jacobian is not diagonal: "
               "the gradient for x_j sums grad_out_i · y_i (δ_ij - y_j) over all i of the row",
          more="split that sum in two: the δ_ij term keeps only i = j; the other term is y_j times one number "
               "per row, the dot product of grad_out with y (keepdims=True keeps it broadcastable). No need to "
               "build the Jacobian")


@exercise("2.5", "softplus op")
def check_softplus(softplus) -> None:
    """Exercise 2.5: a new engine op, softplus(x) = log(1 + exp(x)), with its backward, via `Tensor._op`."""
    from minillm.engine import Tensor

    rng = np.random.default_rng(24)

    def case(x):
        def run():
            grad_out = rng.normal(size=x.shape)
            reference = torch.tensor(x, requires_grad=True)
            expected_y = torch.nn.functional.softplus(reference)
            expected_y.backward(torch.from_numpy(grad_out))
            leaf = Tensor(x.copy(), requires_grad=True)
            y = softplus(leaf)
            what = f"x of shape {x.shape}"
            if not isinstance(y, Tensor):
                raise Mismatch(f"softplus should return a minillm Tensor, got {type(y).__name__}")
            expect_equal(y.data, expected_y.detach().numpy(), what=f"softplus(x) for {what}", atol=1e-12)
            if not y.requires_grad:
                raise Mismatch(f"softplus(x) for {what} recorded no graph (requires_grad is False): "
                               "build the result with Tensor._op(out, (x,), backward, 'softplus')")
            y.backward(grad_out)
            expect_equal(leaf.grad, reference.grad.numpy(), what=f"gradient for {what}", atol=1e-12)
        return run

    cases = [case(rng.normal(size=6)), case(rng.normal(scale=3.0, size=(3, 4))),
             case(np.array([-800.0, -30.0, 0.0, 30.0, 800.0]))]
    check("2.5", cases,
          hint="two separate worries: the forward must never take exp of a large positive number, and the "
               "result must be recorded with Tensor._op so it has a backward (section 4 shows two ops written so)",
          more="rewrite log(1 + e^x) so that only e^(-|x|) appears (np.log1p is exact for tiny arguments); the "
               "derivative of softplus is the sigmoid, which can also be written with a non-positive exponent; "
               "backward returns a one-element tuple")


@exercise("2.6", "MLP backward by hand")
def check_mlp_backward(mlp_backward) -> None:
    """Exercise 2.6: backpropagation by hand through y = tanh(x @ w1 + b1) @ w2 + b2."""
    rng = np.random.default_rng(25)

    def mlp(x, w1, b1, w2, b2):
        return torch.tanh(x @ w1 + b1) @ w2 + b2

    def case(batch, n_in, n_hidden, n_out):
        def run():
            inputs = [rng.normal(size=shape) for shape in
                      ((batch, n_in), (n_in, n_hidden), (n_hidden,), (n_hidden, n_out), (n_out,))]
            grad_out = rng.normal(size=(batch, n_out))
            expected = _torch_grads(mlp, inputs, grad_out)
            got = mlp_backward(*_copies(*inputs, grad_out))
            if not (isinstance(got, tuple) and len(got) == 5):
                raise Mismatch(f"expected a tuple of 5 gradients (x, w1, b1, w2, b2), got {type(got).__name__}"
                               + (f" of length {len(got)}" if isinstance(got, tuple) else ""))
            what = f"x {(batch, n_in)}, hidden size {n_hidden}, output size {n_out}"
            for name, g, e in zip(("x", "w1", "b1", "w2", "b2"), got, expected):
                expect_equal(g, e, what=f"gradient for {name} ({what})", atol=1e-12)
        return run

    cases = [case(4, 3, 5, 2), case(1, 2, 3, 1), case(7, 5, 4, 3)]
    check("2.6", cases,
          hint="go backwards one op at a time, from y to x, and keep every gradient the shape of the value it "
               "belongs to",
          more="the second layer is exercise 2.3's matmul plus a bias added to every row (so its gradient adds "
               "up the rows); then through tanh as in exercise 2.2, recomputing the hidden values; then the "
               "first layer exactly like the second")
