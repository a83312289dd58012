"""8-bit optimizers: `Adam8bit`, `AdamW8bit` and `Lion8bit`, whose state is stored one byte per value.

Chapter 15 teaches this module. It matches bitsandbytes 0.50's optimizers of the same names on CPU bit for
bit: parameters and states after every step, for fp32, fp16 and bf16 parameters, above and below the
small-tensor threshold, with and without weight decay (tests/quant/test_optim8bit.py).

Adam keeps two numbers per parameter (the moments m and v); in fp32 that is 8 bytes per parameter, twice the
parameters themselves. Dettmers et al. (2022, "8-bit Optimizers via Block-wise Quantization") store each
state with chapter 11's blockwise dynamic quantization instead:

1. Before a step, dequantize the states to fp32: `code[byte] * absmax` of the value's 256-element block.
2. Do the ordinary update in fp32.
3. Quantize the new states back to bytes, with a fresh absmax per block.

m can be negative, so it uses the signed dynamic map; v is never negative, so it uses the unsigned map,
which spends all 256 entries on [0, 1] and has twice the resolution. Storage: 1 byte per value per state plus
4 bytes of absmax per 256 values, 2 + 8 / 256 = 2.03 bytes per parameter for Adam.

Tensors with fewer than `min_8bit_size` (4096) elements, such as biases and LayerNorm gains, keep fp32
states: they are a sliver of the memory, and quantizing them would only add noise. bitsandbytes updates them
with a differently arranged (mathematically equal) formula, which we copy, because the arrangement decides
the last bit of the result.

bitsandbytes also has *paged* variants (`PagedAdamW8bit`) that allocate the state in CUDA unified memory, so
the driver can evict it to CPU RAM when the GPU runs short. On a CPU there is nothing to page to: bitsandbytes
warns and runs the ordinary optimizer. We do not implement paging; chapter 15 shows its CPU fallback.
"""

import math
from collections.abc import Iterable
from functools import cache
from itertools import chain

import torch

from minillm.quant.blockwise import FLOAT_DTYPES, create_dynamic_map, dequantize_blockwise, quantize_blockwise

BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers always quantize their states in blocks of 256
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 states (bitsandbytes' `min_8bit_size` default)


@cache
def dynamic_map(signed: bool) -> torch.Tensor:
    """The (256,) code a state is quantized with: signed for m (Adam, Lion), unsigned for v (Adam).
    Built once and shared; it is not part of any parameter's state, as it is the same for all of them."""
    return create_dynamic_map(signed=signed)


class Optimizer8bit(torch.optim.Optimizer):
    """What `Adam8bit` and `Lion8bit` share: validation, the step loop and the dequantize/update/requantize cycle.

    Chapter 15 teaches this. A subclass sets `signed_states` (one bool per state: which dynamic map it uses)
    and implements `_update(p, grad, states, step, group, quantized)`, which changes the fp32 tensors `p` and
    `states` in place (`Lion8bit`), or replaces `_step_one` whole (`Adam8bit`, which calls `adam8bit_step`).

    Per parameter, `optimizer.state[p]` holds, under bitsandbytes' names:
    - `"step"`: the number of steps taken (an int);
    - `"state1"`, `"state2"` (Adam only): m and v, as uint8 codes shaped like p, or as fp32 tensors when p has
      fewer than `min_8bit_size` elements;
    - `"absmax1"`, `"absmax2"`: the fp32 absmax of each 256-element block (8-bit states only).
    """

    signed_states: tuple[bool, ...] = ()

    def __init__(self, params, defaults: dict, min_8bit_size: int):
        name = type(self).__name__
        lr, betas = defaults["lr"], defaults["betas"]
        if not _is_number(lr) or lr < 0:
            raise ValueError(f"{name}: lr must be a number >= 0, got {lr!r}")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2) of numbers in [0, 1), got {betas!r}")
        for key in ("eps", "weight_decay"):
            if key in defaults and (not _is_number(defaults[key]) or defaults[key] < 0):
                raise ValueError(f"{name}: {key} must be a number >= 0, got {defaults[key]!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"{name}: min_8bit_size must be an int >= 1 (tensors with fewer elements keep fp32 "
                             f"states), got {min_8bit_size!r}")
        defaults = dict(defaults, betas=tuple(betas))
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. `closure` re-evaluates the loss, as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                self._step_one(p, state, group)
        return loss

    def _check_gradients(self) -> None:
        """Before any parameter changes: every gradient dense and finite. A NaN or inf cannot be stored in an
        8-bit state (quantize_blockwise refuses it); bitsandbytes takes it without a word and leaves a NaN
        weight, so we stop and say where it is (skip such steps, as torch.amp.GradScaler does)."""
        params = [p for group in self.param_groups for p in group["params"]]  # i: the order they were given in
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(f"{type(self).__name__} does not support sparse gradients")
            if not torch.isfinite(p.grad).all():
                bad = int((~torch.isfinite(p.grad)).sum())
                raise ValueError(f"{type(self).__name__}.step: the gradient of parameter {i} (shape "
                                 f"{tuple(p.shape)}) holds {bad} NaN or infinite value(s); no parameter was "
                                 "updated. Find where the loss overflowed, or skip this step")

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: parameters must have a dtype in {FLOAT_DTYPES}, got {p.dtype}")
        state["step"] = 0
        for i, _ in enumerate(self.signed_states, start=1):
            if p.numel() < self.min_8bit_size:
                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32)
            else:
                # Zero codes with zero absmax dequantize to (+-)0: the same start as fp32 zeros.
                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8)
                state[f"absmax{i}"] = torch.zeros(-(-p.numel() // BLOCKSIZE), dtype=torch.float32, device=p.device)

    def _step_one(self, p: torch.Tensor, state: dict, group: dict) -> None:
        grad = p.grad.float()  # (same shape as p)  the update is computed in fp32 whatever p's dtype
        p32 = p.float()  # p itself when p is fp32, else an fp32 copy written back below
        quantized = "absmax1" in state
        states = (_dequantize_states(state, self.signed_states) if quantized
                  else [state[f"state{i}"] for i, _ in enumerate(self.signed_states, start=1)])
        self._update(p32, grad, states, state["step"], group, quantized)
        p.copy_(p32)  # rounds once to p's dtype
        if quantized:
            _requantize_states(state, self.signed_states, states)

    def _update(self, p, grad, states, step, group, quantized):
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a saved state without torch's cast to each parameter's dtype.

        torch casts every floating-point state tensor to its parameter's dtype on load (right for torch's
        Adam, whose moments have the parameter's dtype). Ours are fp32 by design, also for bf16 parameters:
        a bf16 absmax would change every dequantized value. So the saved tensors are put back as they were.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)


def adam8bit_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, betas: tuple[float, float],
                  eps: float, weight_decay: float) -> None:
    """One Adam step of one parameter, as bitsandbytes' CPU kernels do it: changes `p` and `state` in place.

    Chapter 15 teaches this (build exercise 15.1); `Adam8bit` and `AdamW8bit` call it for every parameter.
    `state` holds bitsandbytes' names: `"step"` (this step's number, counted from 1 by the caller), m and v
    as `"state1"`/`"state2"`, and, for 8-bit states, their block absmax as `"absmax1"`/`"absmax2"`.

    8-bit states: dequantize m (signed map) and v (unsigned map), update in fp32, requantize with a fresh
    absmax per block. fp32 states (tensors under `min_8bit_size`): update them where they are. Both compute
    p -= lr * (m / c1) / (sqrt(v) / c2 + eps), with c1 = 1 - beta1**step and c2 = sqrt(1 - beta2**step), but
    bitsandbytes' two kernels arrange it differently; we copy each arrangement to round exactly as it does.
    """
    beta1, beta2 = betas
    step = state["step"]
    quantized = "absmax1" in state
    m, v = _dequantize_states(state, Adam8bit.signed_states) if quantized else (state["state1"], state["state2"])
    g = grad.float()  # (same shape as p)  the update is computed in fp32 whatever p's dtype
    p32 = p.float()  # p itself when p is fp32, else an fp32 copy written back below
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)  # running mean of the gradient
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # running mean of its square
    bias1 = 1.0 - beta1**step  # m and v start at 0, so early averages are too small by these factors
    bias2 = math.sqrt(1.0 - beta2**step)
    _decay(p32, lr, weight_decay)
    if quantized:
        p32.addcdiv_(m, (v.sqrt() / bias2).add_(eps), value=-lr / bias1)
    else:
        p32.add_(m / (v.sqrt() + eps * bias2), alpha=-lr * bias2 / bias1)
    p.copy_(p32)  # rounds once to p's dtype
    if quantized:
        _requantize_states(state, Adam8bit.signed_states, (m, v))


def _dequantize_states(state: dict, signed_states: tuple[bool, ...]) -> list[torch.Tensor]:
    """A parameter's 8-bit states `state1`, `state2`, ... as fp32 tensors shaped like it."""
    return [dequantize_blockwise(state[f"state{i}"], state[f"absmax{i}"], dynamic_map(signed), BLOCKSIZE)
            for i, signed in enumerate(signed_states, start=1)]


def _requantize_states(state: dict, signed_states: tuple[bool, ...], values) -> None:
    """Store fp32 `values` back into the 8-bit states, in place, with a fresh absmax per 256-element block."""
    for i, (signed, value) in enumerate(zip(signed_states, values), start=1):
        codes, absmax = quantize_blockwise(value, dynamic_map(signed), BLOCKSIZE)
        state[f"state{i}"].copy_(codes)
        state[f"absmax{i}"].copy_(absmax)


def _decay(p: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay (AdamW's): shrink the weights directly, outside the adaptive update."""
    if weight_decay > 0.0:
        p.mul_(1.0 - lr * weight_decay)


class Adam8bit(Optimizer8bit):
    """Adam with 8-bit blockwise states. Matches `bitsandbytes.optim.Adam8bit` on CPU bit for bit.

    Chapter 15 teaches this. As in bitsandbytes, `weight_decay` is *decoupled* (p *= 1 - lr * weight_decay),
    so `Adam8bit(weight_decay=0.01)` is AdamW, not torch's `Adam(weight_decay=0.01)`, which would add
    0.01 * p to the gradient.
    """

    signed_states = (True, False)  # m may be negative: signed map; v >= 0: unsigned map, twice the resolution

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, min_8bit_size: int = MIN_8BIT_SIZE):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, min_8bit_size)

    def _step_one(self, p, state, group):
        # Looked up in the module at call time: chapter 15's `use(adam8bit_step=...)` swaps the learner's in.
        adam8bit_step(p, p.grad, state, group["lr"], group["betas"], group["eps"], group["weight_decay"])


class AdamW8bit(Adam8bit):
    """`Adam8bit` with bitsandbytes' AdamW default `weight_decay=0.01`. Matches `bitsandbytes.optim.AdamW8bit`.

    Chapter 15 teaches this. bitsandbytes runs the same update for both names; only the default differs.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size)


class Lion8bit(Optimizer8bit):
    """Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") with an 8-bit momentum.
    Matches `bitsandbytes.optim.Lion8bit` on CPU bit for bit.

    Chapter 15 teaches this. Each step moves every weight by exactly lr, in the direction of the sign of an
    interpolation between momentum and gradient; the momentum is then updated with a second, slower beta.
    One state instead of Adam's two: 1.02 bytes per parameter in 8 bits.
    """

    signed_states = (True,)

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, min_8bit_size: int = MIN_8BIT_SIZE):
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults, min_8bit_size)

    def _update(self, p, grad, states, step, group, quantized):
        (m,) = states
        beta1, beta2 = group["betas"]
        _decay(p, group["lr"], group["weight_decay"])
        # The same interpolation written as bitsandbytes' two kernels write it (they round differently).
        if quantized:
            direction = torch.sign(m.mul(beta1) + grad.mul(1.0 - beta1))
        else:
            direction = m.mul(beta1).add(grad, alpha=1.0 - beta1).sign()
        p.add_(direction, alpha=-group["lr"])
        m.mul_(beta2).add_(grad, alpha=1.0 - beta2)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in `optimizer.state`, measured, each tensor counted once (works for torch's optimizers).

    Chapter 15 teaches this. A tensor that several parameters' states share (bitsandbytes puts its two 1 KB
    dynamic maps in every parameter's state) is counted once. torch's Adam also keeps each parameter's step
    count as a 0-d fp32 tensor (4 bytes); ours keeps it as an int, which holds no tensor memory.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"state_bytes needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    tensors = {id(value): value for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _is_number(x) -> bool:
    """An int or float, and not NaN (which every `x < 0` check would let through)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
