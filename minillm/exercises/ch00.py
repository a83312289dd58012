"""Checks for chapter 00's exercises; torch judges every answer.

Exercise 0.1 is the course's first build exercise, small on purpose: the learner's stable softmax replaces
`minillm.engine.functional.stable_softmax`, which every engine softmax goes through, and `end_to_end_softmax`
re-runs the engine's causal self-attention on it against `torch.nn.functional.scaled_dot_product_attention`.
"""

import numpy as np
import torch

from minillm.exercises import Mismatch, check, exercise, expect_equal, first_mismatch, verdict


@exercise("0.1", "softmax", kind="build", component="softmax", replaces="minillm.engine.functional:stable_softmax",
          hides=("F.stable_softmax", "F.softmax"))
def check_softmax(softmax) -> None:
    """Exercise 0.1: a numerically stable softmax over the last axis of a numpy array, keeping its dtype."""
    rng = np.random.default_rng(0)

    def case(x, atol=1e-12):
        def run():
            expected = torch.softmax(torch.from_numpy(x), dim=-1).numpy()
            got = softmax(x.copy())
            what = f"softmax of a {x.shape} {x.dtype} array"
            expect_equal(got, expected, what=what, atol=atol)
            if np.asarray(got).dtype != x.dtype:
                raise Mismatch(f"{what}: expected dtype {x.dtype} (the input's), got {np.asarray(got).dtype}")
        return run

    masked = np.array([[0.5, -np.inf, 2.0, -np.inf], [-1.0, 0.0, -np.inf, 3.0]])  # -inf: a masked position
    cases = [case(rng.normal(size=5)), case(rng.normal(size=(3, 7))), case(np.array([[1000.0, 1001.0, 1002.0]])),
             case(masked), case(rng.normal(size=(2, 3, 4, 4))), case(rng.normal(size=(2, 6)).astype(np.float32), 1e-6)]
    check("0.1", cases,
          hint="exp of a score near 1000 is inf in floating point; softmax does not change if every score of a row "
               "moves by the same amount, so choose an amount that keeps every exponent at most 0",
          more="subtract each row's largest score before exponentiating, then divide by the row's sum; reduce "
               "over the last axis only and keep that axis (keepdims=True) so the shapes broadcast back")


def end_to_end_softmax() -> bool:
    """The engine's causal self-attention (chapter 03's `CausalSelfAttention`) with whatever softmax is plugged in,
    against torch's `scaled_dot_product_attention` with the same weights, forward and input gradient.

    One ordinary batch and one with scores in the thousands (exp overflows there unless the softmax is stable).
    Both sides run in float64 with different kernels, so the claim is a tolerance: |Δ| <= 1e-10 + 1e-10·|torch's|.
    """
    from minillm.engine import Tensor, functional as F
    from minillm.engine.random import default_generator
    from minillm.engine.transformer import CausalSelfAttention

    B, T, C, nh = 2, 5, 8, 2
    engine_rng = default_generator().bit_generator
    saved = engine_rng.state
    attention = CausalSelfAttention(C, nh)  # its init draws from the engine's generator: put that state back
    engine_rng.state = saved
    rng = np.random.default_rng(0)
    for p in attention.parameters():
        p.data = rng.uniform(-0.5, 0.5, size=p.shape)  # float64, so both sides compute in float64
    w_attn, b_attn = (torch.from_numpy(p.data) for p in (attention.c_attn.weight, attention.c_attn.bias))
    w_proj, b_proj = (torch.from_numpy(p.data) for p in (attention.c_proj.weight, attention.c_proj.bias))

    def reference(x):  # (B, T, C) float64 -> output and dL/dx for L = sum(output * weights)
        x = torch.from_numpy(x).requires_grad_()
        q, k, v = torch.nn.functional.linear(x, w_attn, b_attn).split(C, dim=-1)  # each (B, T, C)
        q, k, v = (t.reshape(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        out = torch.nn.functional.linear(y.transpose(1, 2).reshape(B, T, C), w_proj, b_proj)
        (out * torch.from_numpy(weights)).sum().backward()
        return out.detach().numpy(), x.grad.numpy()

    weights = rng.normal(size=(B, T, C))
    inputs = {"ordinary scores": rng.normal(size=(B, T, C)), "scores in the thousands": 40 * rng.normal(size=(B, T, C))}
    whose = "your" if F.stable_softmax.__module__ != F.__name__ else "minillm's"
    claim = (f"engine causal self-attention with {whose} softmax matches torch's scaled_dot_product_attention "
             "(output and input gradient, float64, |Δ| <= 1e-10 + 1e-10·|torch's|)")
    for name, x in inputs.items():
        expected_out, expected_grad = reference(x)
        leaf = Tensor(x.copy(), requires_grad=True)
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # a naive softmax's inf/nan shows in the comparison
                out = attention(leaf)
                (out * Tensor(weights)).sum().backward()
        except NotImplementedError:
            raise  # an unwritten stub: use() prints "plug-in skipped"
        except Exception as crash:
            return verdict(False, claim, f"{name}: your code raised {type(crash).__name__}: {crash}")
        for what, got, expected in (("output", out.data, expected_out), ("input gradient", leaf.grad, expected_grad)):
            problem = first_mismatch(got, expected, atol=1e-10, rtol=1e-10)
            if problem is not None:
                return verdict(False, claim, f"{name}, {what}: {problem}")
    return verdict(True, claim)


@exercise("0.2", "count parameters")
def check_count_parameters(count_parameters) -> None:
    """Exercise 0.2: the number of parameters of a linear layer, with and without bias."""

    def case(d_in, d_out, bias):
        def run():
            expected = sum(p.numel() for p in torch.nn.Linear(d_in, d_out, bias=bias).parameters())
            expect_equal(count_parameters(d_in, d_out, bias), expected, what=f"Linear({d_in}, {d_out}, bias={bias})")
        return run

    cases = [case(3, 4, True), case(784, 512, True), case(64, 10, False)]
    check("0.2", cases, hint="count the entries of W and of b separately; the shape of W is in the exercise text",
          more="W has one entry per (output, input) pair; b has one entry per output, and none when bias=False")


@exercise("0.3", "one-hot")
def check_one_hot(one_hot) -> None:
    """Exercise 0.3: one-hot encode integer class ids as a float32 array."""

    def case(ids, num_classes):
        def run():
            expected = torch.nn.functional.one_hot(torch.tensor(ids), num_classes).numpy().astype(np.float32)
            got = one_hot(np.array(ids), num_classes)
            what = f"one_hot({ids}, {num_classes})"
            expect_equal(got, expected, what=what)
            if np.asarray(got).dtype != np.float32:
                raise Mismatch(f"{what}: expected dtype float32 (targets are compared with float probabilities), "
                               f"got {np.asarray(got).dtype}")
        return run

    cases = [case([0, 2, 1], 3), case([4], 6), case([[1, 0], [3, 3]], 4)]
    check("0.3", cases,
          hint="the result has one more axis than ids, of length num_classes: all zeros except a single 1 where "
               "the id points, and it is float32",
          more="row i of the num_classes x num_classes identity matrix is exactly the one-hot vector of id i, and "
               "numpy can pick rows with an integer array of any shape; ask for dtype=np.float32 where you create it")
