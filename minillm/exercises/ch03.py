"""Checks for chapter 03's exercises: torch.optim judges the optimizer steps, torch.nn.Linear judges the
module, and numpy's sliding windows judge the context windows."""

import numpy as np
import torch

from minillm.exercises import Mismatch, check, expect_equal


def _gradients(rng: np.random.Generator, shape: tuple[int, ...], steps: int) -> list[np.ndarray]:
    # Gradients that change sign and size from step to step, so a missing term cannot hide.
    return [rng.normal(scale=1.0 + i, size=shape) for i in range(steps)]


def check_sgd_momentum_step(sgd_momentum_step) -> None:
    """Exercise 3.1: one step of SGD with (heavy-ball) momentum, as ``torch.optim.SGD(momentum=...)``."""
    rng = np.random.default_rng(31)

    def case(shape, lr, momentum, steps=5):
        start, grads = rng.normal(size=shape), _gradients(rng, shape, steps)

        def run():
            reference = torch.tensor(start, requires_grad=True)
            optimizer = torch.optim.SGD([reference], lr=lr, momentum=momentum)
            param, buf = start.copy(), None
            for step, grad in enumerate(grads, start=1):
                reference.grad = torch.from_numpy(grad)
                optimizer.step()
                param, buf = sgd_momentum_step(param, grad.copy(), buf, lr, momentum)
                where = f"step {step} (shape {shape}, lr={lr}, momentum={momentum})"
                expect_equal(buf, optimizer.state[reference]["momentum_buffer"].numpy(),
                             what=f"momentum buffer after {where}", atol=1e-12, rtol=1e-10)
                expect_equal(param, reference.detach().numpy(), what=f"param after {where}", atol=1e-12, rtol=1e-10)
        return run

    cases = [case((5,), lr=0.1, momentum=0.9), case((3, 4), lr=0.02, momentum=0.5), case((2, 3, 1), lr=1.0, momentum=0.99)]
    check("Exercise 3.1 (SGD with momentum)", cases,
          hint="on the first step buf is None: start it as a copy of grad; afterwards buf = momentum * buf + grad "
               "(no (1 - momentum) factor in torch's form); then param = param - lr * buf; return (param, buf)")


def check_adamw_step(adamw_step) -> None:
    """Exercise 3.2: one AdamW step with bias correction and decoupled weight decay, as ``torch.optim.AdamW``."""
    rng = np.random.default_rng(32)

    def case(shape, lr, betas, eps, weight_decay, steps=6):
        start, grads = rng.normal(size=shape), _gradients(rng, shape, steps)

        def run():
            reference = torch.tensor(start, requires_grad=True)
            optimizer = torch.optim.AdamW([reference], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                          foreach=False)
            param, exp_avg, exp_avg_sq = start.copy(), np.zeros(shape), np.zeros(shape)
            for step, grad in enumerate(grads, start=1):
                reference.grad = torch.from_numpy(grad)
                optimizer.step()
                param, exp_avg, exp_avg_sq = adamw_step(param, grad.copy(), exp_avg, exp_avg_sq, step,
                                                        lr, betas, eps, weight_decay)
                state = optimizer.state[reference]
                where = f"step {step} (shape {shape}, lr={lr}, betas={betas}, weight_decay={weight_decay})"
                expect_equal(exp_avg, state["exp_avg"].numpy(), what=f"exp_avg after {where}", atol=1e-12, rtol=1e-9)
                expect_equal(exp_avg_sq, state["exp_avg_sq"].numpy(), what=f"exp_avg_sq after {where}",
                             atol=1e-12, rtol=1e-9)
                expect_equal(param, reference.detach().numpy(), what=f"param after {where}", atol=1e-12, rtol=1e-9)
        return run

    cases = [case((4,), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
             case((3, 5), lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
             case((2, 2, 3), lr=0.3, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.5)]
    check("Exercise 3.2 (AdamW)", cases,
          hint="in order: param *= 1 - lr * weight_decay (decay the weights, do not add it to grad); "
               "m = beta1 * m + (1 - beta1) * grad; v = beta2 * v + (1 - beta2) * grad**2; "
               "param -= lr * (m / (1 - beta1**step)) / (sqrt(v / (1 - beta2**step)) + eps)")


def check_linear_module(linear_class) -> None:
    """Exercise 3.3: a ``Linear`` layer written as an engine Module, judged against ``torch.nn.Linear``."""
    rng = np.random.default_rng(33)

    def parameter_names():
        layer = linear_class(5, 3)
        got = [(name, tuple(p.shape)) for name, p in layer.named_parameters()]
        expected = [(name, tuple(p.shape)) for name, p in torch.nn.Linear(5, 3).named_parameters()]
        if got != expected:
            raise Mismatch(f"named_parameters() of Linear(5, 3): expected {expected}, got {got}")

    def initialisation():
        in_features = 400
        layer = linear_class(in_features, 7)
        bound = 1 / np.sqrt(in_features)
        for name, p in layer.named_parameters():
            values = np.asarray(p.data)
            if np.abs(values).max() > bound or values.std() < bound / 4:
                raise Mismatch(f"{name} of Linear({in_features}, 7): values should be spread uniformly in "
                               f"±1/sqrt(in_features) = ±{bound:.4f}, got range [{values.min():.4f}, {values.max():.4f}]")

    def forward_backward(in_features, out_features, x_shape):
        def run():
            from minillm.engine import Tensor
            torch.manual_seed(in_features)
            reference = torch.nn.Linear(in_features, out_features).double()
            layer = linear_class(in_features, out_features).double()
            layer.load_state_dict(reference.state_dict())
            x = rng.normal(size=x_shape)
            weights = rng.normal(size=x_shape[:-1] + (out_features,))  # a random upstream gradient
            x_ref = torch.tensor(x, requires_grad=True)
            y_ref = reference(x_ref)
            (y_ref * torch.from_numpy(weights)).sum().backward()
            x_ours = Tensor(x, requires_grad=True)
            y_ours = layer(x_ours)
            what = f"Linear({in_features}, {out_features}) on an input of shape {x_shape}"
            expect_equal(y_ours, y_ref.detach().numpy(), what=f"output of {what}", atol=1e-12)
            (y_ours * Tensor(weights)).sum().backward()
            grads = dict(layer.named_parameters())
            for name, p in reference.named_parameters():
                expect_equal(grads[name].grad, p.grad.numpy(), what=f"gradient of {name} of {what}", atol=1e-12)
            expect_equal(x_ours.grad, x_ref.grad.numpy(), what=f"gradient of the input of {what}", atol=1e-12)
        return run

    cases = [parameter_names, initialisation, forward_backward(5, 3, (4, 5)), forward_backward(7, 2, (2, 3, 7)),
             forward_backward(1, 6, (1, 1))]
    check("Exercise 3.3 (Linear module)", cases,
          hint="in __init__: self.weight = nn.Parameter(...) of shape (out_features, in_features) and "
               "self.bias of shape (out_features,), both uniform in ±1/sqrt(in_features) (float32); "
               "forward returns x @ self.weight.T + self.bias")


def check_build_context_windows(build_context_windows) -> None:
    """Exercise 3.4: every (context of block_size ids, next id) pair of a sequence, as two integer arrays."""
    rng = np.random.default_rng(34)

    def case(ids, block_size):
        def run():
            as_array = np.asarray(ids)
            expected_x = np.lib.stride_tricks.sliding_window_view(as_array, block_size)[:-1]  # (N, block_size)
            expected_y = as_array[block_size:]  # (N,)
            got = build_context_windows(ids, block_size)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise Mismatch(f"expected a tuple (X, Y), got {type(got).__name__}")
            what = f"a sequence of {len(as_array)} ids with block_size={block_size}"
            expect_equal(got[0], expected_x, what=f"X for {what}")
            expect_equal(got[1], expected_y, what=f"Y for {what}")
        return run

    cases = [case(np.arange(10), 3), case(rng.integers(0, 60, size=57), 8), case([4, 1, 7, 7, 2], 4),
             case(rng.integers(0, 5, size=31), 1)]
    check("Exercise 3.4 (context windows)", cases,
          hint="there are len(ids) - block_size windows; row i of X is ids[i : i + block_size] and Y[i] is "
               "ids[i + block_size]; np.arange(n)[:, None] + np.arange(block_size) gives every index at once")
