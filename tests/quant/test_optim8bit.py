"""minillm.quant.optim against bitsandbytes' 8-bit optimizers (Adam8bit, AdamW8bit, Lion8bit) on CPU.

Every expected value comes from bitsandbytes run here, on the same parameters and gradients: parameters and
every state tensor (uint8 codes, fp32 absmax, fp32 small-tensor states) must be `torch.equal` after each of
12 steps. Sizes straddle the 4096-element threshold (4095 keeps fp32 states, 4096 is the first 8-bit size) and
include counts that are not a multiple of the 256-element block.
"""

import math
import warnings

import bitsandbytes as bnb
import pytest
import torch

from minillm.quant.optim import BLOCKSIZE, Adam8bit, AdamW8bit, Lion8bit, dynamic_map, state_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 12
SHAPES = [(100,), (4095,), (4096,), (5000,), (33, 257)]  # fp32 states | 8-bit, incl. ragged last blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CONFIGS = [  # (our class, bitsandbytes' class, constructor arguments)
    (Adam8bit, bnb.optim.Adam8bit, dict(lr=1e-2)),
    (Adam8bit, bnb.optim.Adam8bit, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    (AdamW8bit, bnb.optim.AdamW8bit, dict(lr=3e-3)),
    (Lion8bit, bnb.optim.Lion8bit, dict(lr=1e-3, weight_decay=0.1)),
]


def gradients(shape, dtype, seed: int, steps: int = STEPS) -> list[torch.Tensor]:
    """Gradients whose scale changes from step to step and that hold a few outliers and an all-zero block,
    so absmax differs a lot between blocks and between steps."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for step in range(steps):
        grad = torch.randn(shape, generator=g) * (1 + step) ** 0.5
        grad.view(-1)[::997] *= 30
        grad.view(-1)[:BLOCKSIZE] = 0 if step % 3 == 0 else grad.view(-1)[:BLOCKSIZE]
        grads.append(grad.to(dtype))
    return grads


def assert_same(ours, theirs, p, q, where: str) -> None:
    assert torch.equal(p, q), (f"{where}: parameters differ from bitsandbytes' (max |diff| "
                               f"{(p.float() - q.float()).abs().max().item():.3g}); check the op order of _update")
    for key, value in ours.state[p].items():
        expected = theirs.state[q][key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == expected.dtype and value.shape == expected.shape, (
                f"{where}: state {key!r} is {value.dtype} {tuple(value.shape)}, bitsandbytes has "
                f"{expected.dtype} {tuple(expected.shape)}")
            assert torch.equal(value, expected), f"{where}: state {key!r} differs from bitsandbytes'"
        else:
            assert value == expected, f"{where}: state {key!r} is {value!r}, bitsandbytes has {expected!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0].__name__}-{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_against_bitsandbytes(shape, dtype, config):
    ours_cls, bnb_cls, kwargs = config
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours, theirs = ours_cls([p], **kwargs), bnb_cls([q], **kwargs)
    for step, grad in enumerate(gradients(shape, dtype, seed=2), start=1):
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        assert_same(ours, theirs, p, q, f"{ours_cls.__name__} {shape} {dtype} step {step}")


@pytest.mark.parametrize("cls, bnb_cls", [(Adam8bit, bnb.optim.Adam8bit), (Lion8bit, bnb.optim.Lion8bit)])
def test_min_8bit_size_moves_the_threshold(cls, bnb_cls):
    """min_8bit_size=64: a 100-element tensor (one short block) gets 8-bit state, a 50-element one stays fp32."""
    start = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (100, 50)]
    ours_params = [torch.nn.Parameter(x.clone()) for x in start]
    bnb_params = [torch.nn.Parameter(x.clone()) for x in start]
    ours, theirs = cls(ours_params, lr=1e-2, min_8bit_size=64), bnb_cls(bnb_params, lr=1e-2, min_8bit_size=64)
    for step, grads in enumerate(zip(gradients((100,), torch.float32, 10), gradients((50,), torch.float32, 11))):
        for p, q, grad in zip(ours_params, bnb_params, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        for p, q in zip(ours_params, bnb_params):
            assert_same(ours, theirs, p, q, f"{cls.__name__} min_8bit_size=64, {p.numel()} values, step {step + 1}")
    assert ours.state[ours_params[0]]["state1"].dtype == torch.uint8, "100 >= 64 elements: 8-bit state"
    assert ours.state[ours_params[1]]["state1"].dtype == torch.float32, "50 < 64 elements: fp32 state"


def test_state_layout_and_measured_bytes():
    big, small = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(300))
    optimizer = Adam8bit([big, small])
    big.grad, small.grad = torch.randn(5000), torch.randn(300)
    optimizer.step()
    blocks = math.ceil(5000 / BLOCKSIZE)
    state = optimizer.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == big.shape, "8-bit m: uint8 like p"
    assert state["absmax1"].dtype == torch.float32 and state["absmax1"].shape == (blocks,), "one absmax per block"
    assert optimizer.state[small]["state1"].dtype == torch.float32, "a 300-element tensor keeps fp32 states"
    assert "absmax1" not in optimizer.state[small], "fp32 states need no absmax"
    # Measured: 2 bytes of codes + 2 * 4 bytes of absmax per block (big), 2 * 4 bytes per value (small).
    assert state_bytes(optimizer) == 2 * 5000 + 2 * 4 * blocks + 2 * 4 * 300
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.randn(5000))])
    reference.param_groups[0]["params"][0].grad = torch.randn(5000)
    reference.step()
    assert state_bytes(reference) == 8 * 5000 + 4, "torch AdamW: m and v in fp32 plus a 0-d fp32 step tensor"
    theirs = bnb.optim.Adam8bit([big.detach().clone().requires_grad_(), small.detach().clone().requires_grad_()])
    for q, grad in zip(theirs.param_groups[0]["params"], (big.grad, small.grad)):
        q.grad = grad.clone()
    theirs.step()
    assert state_bytes(theirs) == state_bytes(optimizer) + 2 * 256 * 4, (
        "bitsandbytes' state holds the same tensors plus its two shared (256,) fp32 maps, each counted once")


def test_maps_are_signed_for_m_and_unsigned_for_v():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert torch.equal(signed, bnb.functional.create_dynamic_map(signed=True))
    assert torch.equal(unsigned, bnb.functional.create_dynamic_map(signed=False))
    assert signed.min() < 0 and unsigned.min() == 0, "m needs negative entries, v does not"
    assert Adam8bit.signed_states == (True, False) and Lion8bit.signed_states == (True,)


def test_model_with_groups_schedule_and_frozen_parameters():
    """A small model trained by backprop: two param groups with different lr and weight decay, an lr changed
    between steps (a schedule), a frozen layer without gradients, sizes on both sides of the threshold."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 48),
                                   torch.nn.Linear(48, 8))

    ours_model, bnb_model = model(), model()
    for m in (ours_model, bnb_model):
        m[3].requires_grad_(False)

    def groups(m):
        return [{"params": [m[0].weight, m[2].weight], "weight_decay": 0.1},
                {"params": [m[0].bias, m[2].bias, m[3].weight], "weight_decay": 0.0, "lr": 5e-3}]

    ours, theirs = AdamW8bit(groups(ours_model), lr=1e-2), bnb.optim.AdamW8bit(groups(bnb_model), lr=1e-2)
    data = torch.Generator().manual_seed(3)
    for step in range(10):
        x, y = torch.randn(32, 64, generator=data), torch.randn(32, 8, generator=data)
        for m, optimizer in ((ours_model, ours), (bnb_model, theirs)):
            optimizer.param_groups[0]["lr"] = 1e-2 * (0.9**step)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            optimizer.step()
        for (name, p), q in zip(ours_model.named_parameters(), bnb_model.parameters()):
            assert torch.equal(p, q), f"step {step + 1}: {name} differs from bitsandbytes'"
    assert ours_model[3].weight not in ours.state or not ours.state[ours_model[3].weight], "frozen: no state"


def test_state_dict_round_trip_keeps_fp32_state_for_bf16_parameters():
    """torch's load_state_dict would cast absmax to bf16 for a bf16 parameter; ours must keep it fp32, so a run
    saved and reloaded after 5 steps continues exactly like one that never stopped."""
    grads = gradients((5000,), torch.bfloat16, seed=4, steps=10)
    start = torch.randn(5000, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    straight, resumed = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    first = AdamW8bit([straight], lr=1e-2)
    for grad in grads:
        straight.grad = grad.clone()
        first.step()
    before = AdamW8bit([resumed], lr=1e-2)
    for grad in grads[:5]:
        resumed.grad = grad.clone()
        before.step()
    saved = before.state_dict()
    after = AdamW8bit([resumed], lr=1e-2)
    after.load_state_dict(saved)
    assert after.state[resumed]["absmax1"].dtype == torch.float32, "absmax must stay fp32 after loading"
    for grad in grads[5:]:
        resumed.grad = grad.clone()
        after.step()
    assert torch.equal(straight, resumed), "a reloaded optimizer must continue exactly where it stopped"


def test_bitsandbytes_paged_optimizer_falls_back_on_cpu():
    """What chapter 15 shows: on CPU, bitsandbytes' PagedAdamW8bit warns and computes what AdamW8bit does."""
    start = torch.randn(5000, generator=torch.Generator().manual_seed(6))
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours, paged = AdamW8bit([p]), bnb.optim.PagedAdamW8bit([q])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for grad in gradients((5000,), torch.float32, seed=7, steps=3):
            p.grad, q.grad = grad.clone(), grad.clone()
            ours.step()
            paged.step()
    assert any("Paged optimizers are not supported on CPU" in str(w.message) for w in caught)
    assert torch.equal(p, q), "the CPU fallback of PagedAdamW8bit should equal AdamW8bit"


def test_tracks_fp32_adamw():
    """8-bit states are an approximation: after 20 steps the weights stay within a few percent of lr of fp32
    AdamW's (each step moves a weight by about lr)."""
    start = torch.randn(8192, generator=torch.Generator().manual_seed(8))
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours, reference = AdamW8bit([p], lr=1e-3), torch.optim.AdamW([q], lr=1e-3, weight_decay=1e-2)
    for grad in gradients((8192,), torch.float32, seed=9, steps=20):
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    moved = (q - start).abs().mean()
    assert (p - q).abs().mean() < 0.05 * moved, "8-bit AdamW drifted far from fp32 AdamW"


def test_closure_and_parameters_without_gradients():
    p, idle = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    optimizer = Lion8bit([p, idle], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (p * torch.arange(10.0)).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 45.0, "step(closure) returns the closure's loss"
    assert torch.equal(idle, torch.ones(10)) and not optimizer.state[idle], "no gradient: no update, no state"


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit, Lion8bit])
@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr must be a number >= 0"),
    (dict(betas=(0.9, 1.0)), "betas must be a pair"),
    (dict(betas=(-0.1, 0.9)), "betas must be a pair"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(weight_decay=-0.1), "weight_decay must be a number >= 0"),
    (dict(min_8bit_size=0), "min_8bit_size must be an int >= 1"),
])
def test_bad_hyperparameters_raise(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_bad_eps_and_inputs_raise():
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        Adam8bit([torch.nn.Parameter(torch.zeros(3))], eps=-1e-8)
    integer = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    integer.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="parameters must have a dtype in"):
        Adam8bit([integer]).step()
    sparse = torch.nn.Parameter(torch.zeros(3))
    sparse.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        Adam8bit([sparse]).step()
    with pytest.raises(TypeError, match="state_bytes needs a torch.optim.Optimizer"):
        state_bytes({})
