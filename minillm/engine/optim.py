"""Optimizers that update engine parameters in place: SGD and AdamW.

Chapter 03 teaches this. Each update follows the arithmetic order of torch.optim's single-tensor
implementation (``foreach=False``), so twenty steps here agree with twenty steps of ``torch.optim.SGD``
and ``torch.optim.AdamW`` to rounding error, in float32 and in float64. (Not bit for bit: torch's kernels
fuse ``p + alpha * g`` into one multiply-add with a single rounding, numpy rounds the product and the sum.)

An optimizer only reads ``p.grad`` and writes ``p.data`` (both numpy arrays); it never builds a graph.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from minillm.engine.tensor import Tensor


class Optimizer:
    """Holds parameter groups and per-parameter state; subclasses write ``step``.

    ``params`` is an iterable of parameters, or of dicts ``{"params": [...], "lr": ...}`` whose keys
    override ``defaults`` for that group (as in torch).
    """

    def __init__(self, params: Iterable, defaults: dict):
        self.defaults = dict(defaults)
        # Per-parameter buffers (momentum, Adam's moments), keyed by the parameter itself as in torch.
        self.state: dict = {}
        self.param_groups: list[dict] = []
        if isinstance(params, Tensor):  # a Tensor is iterable (row by row), which is never what was meant
            raise TypeError("params must be an iterable of Tensors or of dicts, got a single Tensor; "
                            "wrap it in a list: [p]")
        groups = list(params)
        if len(groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a parameter group must be a dict with a 'params' key, "
                            f"got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, got {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError("optimizer can only optimize tensors with requires_grad=True "
                                 "(use nn.Parameter or Tensor(..., requires_grad=True))")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor: the optimizer updates leaves "
                                 "(parameters), not results computed from them")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in parameter group; "
                             f"allowed: {sorted(self.defaults)}")
        self.param_groups.append({**self.defaults, **group, "params": params})

    def zero_grad(self) -> None:
        """Forget every gradient (``p.grad = None``), torch's default ``set_to_none=True``."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement step()")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0.0:  # written this way so NaN is rejected too
        raise ValueError(f"Invalid {name}: {value}")


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov and L2 weight decay.

    Matches ``torch.optim.SGD``. Per parameter, with g its gradient:
        g = g + weight_decay * p
        b = g (first step)  or  b = momentum * b + (1 - dampening) * g
        g = g + momentum * b (Nesterov)  or  g = b
        p = p - lr * g
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        _check_non_negative("learning rate", lr)
        _check_non_negative("momentum value", momentum)
        _check_non_negative("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            dampening, weight_decay = group["dampening"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if weight_decay != 0:
                    grad = grad + weight_decay * p.data
                if momentum != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        # The first step copies the gradient undamped, as torch does.
                        buf = state["momentum_buffer"] = np.array(grad, copy=True)
                    else:
                        buf *= momentum
                        buf += (1 - dampening) * grad
                    grad = grad + momentum * buf if group["nesterov"] else buf
                p.data -= lr * grad


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), matching ``torch.optim.AdamW``.

    Per parameter, at step t with gradient g:
        p = p * (1 - lr * weight_decay)                 # decay acts on the weights, not on g
        m = m + (1 - beta1) * (g - m)                   # torch's lerp form of beta1*m + (1-beta1)*g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        _check_non_negative("learning rate", lr)
        _check_non_negative("epsilon value", eps)
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        _check_non_negative("weight_decay value", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self) -> None:
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, weight_decay = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state.setdefault(p, {})
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = np.zeros_like(p.data)
                    state["exp_avg_sq"] = np.zeros_like(p.data)
                state["step"] += 1
                step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]

                if weight_decay != 0:
                    p.data *= 1 - lr * weight_decay
                exp_avg += (1 - beta1) * (grad - exp_avg)
                exp_avg_sq *= beta2
                exp_avg_sq += (1 - beta2) * grad * grad

                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = np.sqrt(exp_avg_sq) / bias_correction2**0.5 + eps
                p.data += -step_size * exp_avg / denom
