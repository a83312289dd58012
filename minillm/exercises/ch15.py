"""Checks for chapter 15's exercises. The references run inside each check: bitsandbytes' `dequantize_blockwise`,
its 32-bit `Lion` and its `Adam8bit` state, and torch's `AdamW` for the fp32 Adam step."""

import torch

from minillm.exercises import Mismatch, check, expect_equal, expect_tensor


def _bnb():
    import bitsandbytes as bnb  # imported here: importing bitsandbytes takes a moment
    return bnb


def _randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale




def _expect_tuple(got, length: int, what: str) -> tuple:
    if not isinstance(got, tuple) or len(got) != length:
        raise Mismatch(f"{what}: expected a tuple of {length} tensors, got {type(got).__name__}")
    return got


def check_dequantize_state(dequantize_state) -> None:
    """Exercise 15.1: `dequantize_state(codes, absmax, code)` turns an 8-bit optimizer state (uint8 codes shaped
    like the parameter, one fp32 absmax per 256 values) back into fp32 values of the same shape."""
    def case(shape, signed, seed):
        def run():
            bnb_F = _bnb().functional
            code = bnb_F.create_dynamic_map(signed=signed)
            values = _randn(shape, seed, scale=1e-3)
            values = values if signed else values.square()  # Adam's v is never negative
            codes, state = bnb_F.quantize_blockwise(values, code=code, blocksize=256)
            expected = bnb_F.dequantize_blockwise(codes, absmax=state.absmax, code=code, blocksize=256)
            what = f"dequantize_state(codes of shape {tuple(shape)}, {'signed' if signed else 'unsigned'} map)"
            got = dequantize_state(codes.clone(), state.absmax.clone(), code.clone())
            expect_tensor(got, expected, what, check_dtype=False)
            expect_equal(got, expected, what=what, atol=0, rtol=1e-6)
        return run

    cases = [case((256,), True, 1), case((1000,), True, 2), case((7, 300), False, 3), case((4096,), False, 4)]
    check("Exercise 15.1 (dequantize an 8-bit state)", cases,
          hint="flatten; value i belongs to block i // 256: code[codes.long()] * absmax.repeat_interleave(256)[:n], "
               "then reshape like codes (the last block may be shorter than 256)")


def check_adam_step(adam_step) -> None:
    """Exercise 15.2: `adam_step(p, grad, m, v, step, lr, betas, eps, weight_decay)` returns the new (p, m, v)
    of one AdamW step in fp32, with decoupled weight decay, from m and v after `step - 1` steps."""
    def case(n, step, weight_decay, seed):
        def run():
            p, grad = _randn(n, seed), _randn(n, seed + 1, scale=0.1)
            m = _randn(n, seed + 2, scale=0.01) if step > 1 else torch.zeros(n)
            v = _randn(n, seed + 3, scale=0.01).square() if step > 1 else torch.zeros(n)
            lr, betas, eps = 1e-2, (0.9, 0.99), 1e-8
            param = torch.nn.Parameter(p.clone())
            reference = torch.optim.AdamW([param], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                          foreach=False)
            reference.state[param] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.clone(),
                                      "exp_avg_sq": v.clone()}
            param.grad = grad.clone()
            reference.step()
            expected = (param.detach(), reference.state[param]["exp_avg"], reference.state[param]["exp_avg_sq"])
            what = f"adam_step(step={step}, weight_decay={weight_decay})"
            got = _expect_tuple(adam_step(p.clone(), grad.clone(), m.clone(), v.clone(), step, lr, betas, eps,
                                          weight_decay), 3, what)
            for name, g, e in zip(("p", "m", "v"), got, expected):
                expect_tensor(g, e, f"{what}, {name}", check_dtype=False)
                expect_equal(g, e, what=f"{what}, new {name}", atol=1e-7, rtol=1e-5)
        return run

    cases = [case(10, 1, 0.0, 1), case(300, 5, 0.0, 2), case(300, 5, 0.1, 3), case(64, 100, 0.01, 4)]
    check("Exercise 15.2 (one Adam step on dequantized states)", cases,
          hint="m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g; p = p*(1 - lr*wd) (decoupled, not added to g); "
               "p -= lr * (m / (1 - b1**step)) / (sqrt(v / (1 - b2**step)) + eps)")


def check_lion_step(lion_step) -> None:
    """Exercise 15.3: `lion_step(p, grad, m, lr, betas, weight_decay)` returns the new (p, m) of one Lion step."""
    def case(n, weight_decay, seed):
        def run():
            p, grad, m = _randn(n, seed), _randn(n, seed + 1, scale=0.1), _randn(n, seed + 2, scale=0.1)
            lr, betas = 1e-3, (0.9, 0.99)
            param = torch.nn.Parameter(p.clone())
            reference = _bnb().optim.Lion([param], lr=lr, betas=betas, weight_decay=weight_decay, optim_bits=32)
            reference.state[param] = {"step": 3, "state1": m.clone()}  # a momentum from earlier steps
            param.grad = grad.clone()
            reference.step()
            expected = (param.detach(), reference.state[param]["state1"])
            what = f"lion_step({n} values, weight_decay={weight_decay})"
            got = _expect_tuple(lion_step(p.clone(), grad.clone(), m.clone(), lr, betas, weight_decay), 2, what)
            for name, g, e in zip(("p", "m"), got, expected):
                expect_tensor(g, e, f"{what}, {name}", check_dtype=False)
                expect_equal(g, e, what=f"{what}, new {name}", atol=1e-7, rtol=1e-6)
        return run

    cases = [case(16, 0.0, 1), case(500, 0.0, 2), case(500, 0.5, 3)]
    check("Exercise 15.3 (the Lion update)", cases,
          hint="p = p*(1 - lr*wd); p -= lr * sign(b1*m + (1-b1)*g) - the sign uses beta1 and the OLD m; "
               "only then m = b2*m + (1-b2)*g")


def check_adam8bit_state_bytes(adam8bit_state_bytes) -> None:
    """Exercise 15.4: `adam8bit_state_bytes(numels)` is the bytes of 8-bit Adam's state for parameters with these
    element counts (default `min_8bit_size=4096`), counted over m, v and their absmax."""
    def case(numels):
        def run():
            bnb = _bnb()
            params = [torch.nn.Parameter(torch.zeros(n)) for n in numels]
            optimizer = bnb.optim.Adam8bit(params)
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer.step()
            keys = ("state1", "state2", "absmax1", "absmax2")  # bitsandbytes also stores the shared maps (qmap)
            expected = sum(t.numel() * t.element_size()
                           for state in optimizer.state.values() for k, t in state.items() if k in keys)
            got = adam8bit_state_bytes(list(numels))
            what = f"adam8bit_state_bytes({list(numels)})"
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                raise Mismatch(f"{what}: expected a number, got {type(got).__name__}")
            expect_equal(float(got), float(expected), what=what, atol=0, rtol=0)
        return run

    cases = [case([8192]), case([5000]), case([100, 4095]), case([4096, 128, 65536, 300])]
    check("Exercise 15.4 (bytes of 8-bit Adam state)", cases,
          hint="n >= 4096: 2 bytes of codes per value + 2 absmax of 4 bytes per block of 256 (ceil(n / 256) blocks);"
               " n < 4096: m and v stay fp32, 8 bytes per value")

