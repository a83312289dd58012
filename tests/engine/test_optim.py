"""minillm.engine.optim against torch.optim: same parameters, same gradient sequence, same steps.

Both optimizers start from identical parameter values and are fed identical gradients (drawn from a seeded
rng), so any difference after 20 steps comes from the update rule, not from the data.
"""

import numpy as np
import pytest
import torch

from minillm.engine import Tensor, optim

SHAPES = [(3, 4), (5,), (2, 3, 2)]
STEPS = 20
# (rtol, atol) per dtype. torch fuses `p + alpha * g` into one multiply-add (one rounding, numpy rounds
# twice), so the two agree to a few ulps of the parameters' size, not bit for bit.
TOLERANCE = {np.float64: (1e-12, 1e-14), np.float32: (1e-6, 1e-6)}

SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=0.01),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.3),
    "everything": dict(lr=0.03, momentum=0.7, dampening=0.1, weight_decay=0.05),
}
ADAMW_CASES = {
    "default_decay": dict(lr=1e-2),
    "no_decay": dict(lr=1e-2, weight_decay=0.0),
    "custom": dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
}


def run_both(ours_cls, torch_cls, kwargs, dtype, seed=0):
    """Step our optimizer and torch's side by side; return both lists of final parameter arrays."""
    rng = np.random.default_rng(seed)
    inits = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
    ours = [Tensor(a.copy(), requires_grad=True) for a in inits]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in inits]
    opt_ours = ours_cls(ours, **kwargs)
    opt_theirs = torch_cls(theirs, foreach=False, **kwargs)
    for step in range(STEPS):
        for p, t in zip(ours, theirs):
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad = g.copy()
            t.grad = torch.from_numpy(g.copy())
        opt_ours.step()
        opt_theirs.step()
    return [p.data for p in ours], [t.detach().numpy() for t in theirs]


def assert_params_match(ours, theirs, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype, f"{what}: parameter {i} changed dtype to {a.dtype}; updates must keep {b.dtype}"
        np.testing.assert_allclose(
            a, b, rtol=rtol, atol=atol,
            err_msg=f"{what}: parameter {i} differs from torch after {STEPS} steps; "
                    "check the update order against torch's _single_tensor implementation")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_torch(case, dtype):
    ours, theirs = run_both(optim.SGD, torch.optim.SGD, SGD_CASES[case], dtype)
    assert_params_match(ours, theirs, dtype, f"SGD({case})")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ADAMW_CASES)
def test_adamw_matches_torch(case, dtype):
    ours, theirs = run_both(optim.AdamW, torch.optim.AdamW, ADAMW_CASES[case], dtype)
    assert_params_match(ours, theirs, dtype, f"AdamW({case})")


def test_parameters_without_grad_are_left_alone():
    p, q = Tensor(np.ones(3), requires_grad=True), Tensor(np.ones(3), requires_grad=True)
    opt = optim.AdamW([p, q], lr=0.1)
    p.grad = np.ones(3)
    opt.step()
    assert not np.array_equal(p.data, np.ones(3)), "a parameter with a gradient must move"
    np.testing.assert_array_equal(q.data, np.ones(3), err_msg="a parameter whose .grad is None must not "
                                                             "move, not even by weight decay (as in torch)")


def test_zero_grad_sets_grads_to_none():
    p = Tensor(np.ones(3), requires_grad=True)
    opt = optim.SGD([p], lr=0.1)
    p.grad = np.ones(3)
    opt.zero_grad()
    assert p.grad is None, "zero_grad() must set .grad to None (torch's default set_to_none=True)"


def test_param_groups_use_their_own_options():
    rng = np.random.default_rng(1)
    a, b, g = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4)
    ours = [Tensor(a.copy(), requires_grad=True), Tensor(b.copy(), requires_grad=True)]
    theirs = [torch.tensor(a.copy(), requires_grad=True), torch.tensor(b.copy(), requires_grad=True)]
    opt_ours = optim.SGD([{"params": [ours[0]]}, {"params": [ours[1]], "lr": 0.5}], lr=0.1, momentum=0.9)
    opt_theirs = torch.optim.SGD([{"params": [theirs[0]]}, {"params": [theirs[1]], "lr": 0.5}],
                                 lr=0.1, momentum=0.9, foreach=False)
    for _ in range(3):
        for p, t in zip(ours, theirs):
            p.grad, t.grad = g.copy(), torch.from_numpy(g.copy())
        opt_ours.step()
        opt_theirs.step()
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12,
                                   err_msg="a group's own 'lr' must override the default for that group")


BAD_HYPERPARAMETERS = [
    ("SGD", dict(lr=-0.1)),
    ("SGD", dict(lr=0.1, momentum=-0.5)),
    ("SGD", dict(lr=0.1, weight_decay=-1.0)),
    ("SGD", dict(lr=0.1, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    ("AdamW", dict(lr=-1.0)),
    ("AdamW", dict(eps=-1e-8)),
    ("AdamW", dict(betas=(1.0, 0.999))),
    ("AdamW", dict(betas=(0.9, -0.1))),
    ("AdamW", dict(weight_decay=-0.1)),
]


@pytest.mark.parametrize("name, kwargs", BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise_like_torch(name, kwargs):
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError) as ours:
        getattr(optim, name)([Tensor(np.zeros(2), requires_grad=True)], **kwargs)
    assert str(ours.value) == str(theirs.value), \
        f"{name}({kwargs}) should say what torch says: {theirs.value!r}, got {ours.value!r}"


def test_bad_parameter_lists_raise():
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="requires_grad=True"):
        optim.SGD([Tensor(np.zeros(2))], lr=0.1)
    with pytest.raises(TypeError, match=r"single Tensor; wrap it in a list"):
        optim.SGD(Tensor(np.zeros(2), requires_grad=True), lr=0.1)
    with pytest.raises(TypeError, match="only optimize Tensors, got ndarray"):
        optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        optim.SGD([Tensor(np.zeros(2), requires_grad=True) * 2], lr=0.1)
    p = Tensor(np.zeros(2), requires_grad=True)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="unknown option"):
        optim.SGD([{"params": [p], "betas": (0.9, 0.99)}], lr=0.1)
