"""Checks for chapter 02's exercises: torch.autograd judges every gradient.

Each check builds the same computation in torch (float64), runs `backward` with the same upstream gradient
the learner receives, and compares the learner's answer with torch's `.grad`.
"""

import numpy as np
import torch

from minillm.exercises import Mismatch, check, expect_equal


def _torch_grads(fn, inputs: list[np.ndarray], grad_out: np.ndarray) -> list[np.ndarray]:
    """Gradients of `fn(*inputs)` against each input, given the upstream gradient `grad_out`, from torch."""
    leaves = [torch.tensor(x, requires_grad=True) for x in inputs]
    fn(*leaves).backward(torch.from_numpy(grad_out))
    return [leaf.grad.numpy() for leaf in leaves]


def _copies(*arrays):
    # The learner gets copies, so an answer that writes into its inputs cannot spoil the reference.
    return tuple(a.copy() for a in arrays)


def check_tanh_backward(tanh_backward) -> None:
    """Exercise 2.1: the gradient of y = tanh(x) with respect to x, given dL/dy."""
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
    check("Exercise 2.1 (tanh backward)", cases,
          hint="d tanh(x)/dx = 1 - tanh(x)**2 (not 1 - x**2); the chain rule multiplies it elementwise by grad_out")


def check_matmul_backward(matmul_backward) -> None:
    """Exercise 2.2: both gradients of c = a @ b, including a `b` shared by a batch of `a`s."""
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
    check("Exercise 2.2 (matmul backward)", cases,
          hint="grad_a = grad_out @ bᵀ and grad_b = aᵀ @ grad_out, transposing only the last two axes "
               "(np.swapaxes(x, -1, -2)); when one b serves a whole batch, sum grad_b over the batch axis "
               "so it has b's shape")


def check_softmax_backward(softmax_backward) -> None:
    """Exercise 2.3: the gradient of y = softmax(x) over the last axis, from y and dL/dy alone."""
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
    check("Exercise 2.3 (softmax backward)", cases,
          hint="every output depends on every input of its row: dy_i/dx_j = y_i (δ_ij - y_j), so "
               "grad_x = y * (grad_out - (grad_out * y).sum(axis=-1, keepdims=True)); y * (1 - y) * grad_out "
               "keeps only the diagonal")


def check_softplus(softplus) -> None:
    """Exercise 2.4: a new engine op, softplus(x) = log(1 + exp(x)), with its backward, via `Tensor._op`."""
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
    check("Exercise 2.4 (softplus op)", cases,
          hint="forward: np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x))) never overflows (exp(800) is inf); "
               "backward: d softplus/dx = sigmoid(x) = np.exp(x - softplus(x)) (an exponent <= 0, so no overflow "
               "either), times g; return Tensor._op(out, (x,), backward, 'softplus')")


def check_mlp_backward(mlp_backward) -> None:
    """Exercise 2.5: backpropagation by hand through y = tanh(x @ w1 + b1) @ w2 + b2."""
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
    check("Exercise 2.5 (MLP backward by hand)", cases,
          hint="go backwards one step at a time: grad_b2 = grad_out summed over the batch, grad_w2 = hᵀ @ grad_out, "
               "grad_h = grad_out @ w2ᵀ; through tanh: grad_pre = grad_h * (1 - h**2) with h = tanh(x @ w1 + b1); "
               "then grad_b1, grad_w1, grad_x from grad_pre exactly as for the second layer")
