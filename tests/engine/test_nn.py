"""minillm.engine.nn against torch.nn: each layer and its torch twin share weights (copied through
state_dict), see the same input, and must produce the same output and the same gradients."""

import numpy as np
import pytest
import torch

from minillm.engine import Tensor, manual_seed, nn


def randomize(torch_module, seed=0):
    """Give every parameter of the torch twin random values, so that LayerNorm's ones/zeros start
    cannot hide a mistake in how weight or bias is used."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return torch_module


def twins(make_ours, make_theirs):
    """A float64 torch module with random weights and our module loaded from its state_dict."""
    theirs = randomize(make_theirs().double())
    ours = make_ours().double()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


def upstream_like(shape, seed=1):
    """d(loss)/d(out) used to seed both backward passes: random, so every output element matters."""
    return np.random.default_rng(seed).standard_normal(shape)


def forward_backward_ours(module, x):
    x = Tensor(x.copy(), requires_grad=True)
    out = module(x)
    (out * Tensor(upstream_like(out.shape))).sum().backward()
    return out.data, x.grad, {name: p.grad for name, p in module.named_parameters()}


def forward_backward_torch(module, x):
    x = torch.tensor(x, requires_grad=True)
    out = module(x)
    (out * torch.from_numpy(upstream_like(tuple(out.shape)))).sum().backward()
    return out.detach().numpy(), x.grad.numpy(), {n: p.grad.numpy() for n, p in module.named_parameters()}


LAYERS = {
    "linear": (lambda: nn.Linear(5, 3), lambda: torch.nn.Linear(5, 3), (4, 5)),
    "linear_batched_no_bias": (lambda: nn.Linear(5, 3, bias=False),
                               lambda: torch.nn.Linear(5, 3, bias=False), (2, 4, 5)),
    "layernorm": (lambda: nn.LayerNorm(6), lambda: torch.nn.LayerNorm(6), (3, 4, 6)),
    "relu": (nn.ReLU, torch.nn.ReLU, (3, 7)),
    "tanh": (nn.Tanh, torch.nn.Tanh, (3, 7)),
    "gelu": (nn.GELU, lambda: torch.nn.GELU(approximate="tanh"), (3, 7)),
    "sequential": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 2)),
                   lambda: torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.LayerNorm(8),
                                               torch.nn.Linear(8, 2)), (6, 5)),
    "mlp": (lambda: nn.MLP([5, 7, 7, 3], activation=nn.GELU),
            lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(approximate="tanh"),
                                        torch.nn.Linear(7, 7), torch.nn.GELU(approximate="tanh"),
                                        torch.nn.Linear(7, 3)), (4, 5)),
}


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_matches_torch_forward_and_backward(layer):
    make_ours, make_theirs, in_shape = LAYERS[layer]
    ours, theirs = twins(make_ours, make_theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()], \
        f"{layer}: parameter names/order must equal torch's so state_dicts map 1:1"
    x = np.random.default_rng(0).standard_normal(in_shape)
    out_t, dx_t, grads_t = forward_backward_torch(theirs, x)
    out_o, dx_o, grads_o = forward_backward_ours(ours, x)

    np.testing.assert_allclose(out_o, out_t, rtol=1e-10, atol=1e-12, err_msg=f"{layer}: forward differs")
    np.testing.assert_allclose(dx_o, dx_t, rtol=1e-10, atol=1e-12, err_msg=f"{layer}: input gradient differs")
    for name, g in grads_t.items():
        assert grads_o[name] is not None, f"{layer}: {name}.grad is None after backward"
        np.testing.assert_allclose(grads_o[name], g, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{layer}: gradient of {name} differs from torch")


def test_embedding_matches_torch_with_repeated_ids():
    ours, theirs = twins(lambda: nn.Embedding(10, 4), lambda: torch.nn.Embedding(10, 4))
    ids = np.array([[1, 3, 3], [9, 1, 0]])  # repeated ids: their gradients must add up
    out_t = theirs(torch.from_numpy(ids))
    (out_t * torch.from_numpy(upstream_like(tuple(out_t.shape)))).sum().backward()
    out_o = ours(Tensor(ids))
    (out_o * Tensor(upstream_like(out_o.shape))).sum().backward()
    np.testing.assert_allclose(out_o.data, out_t.detach().numpy(), rtol=1e-12, err_msg="Embedding forward")
    np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), rtol=1e-12,
                               err_msg="Embedding weight gradient: rows of repeated ids must accumulate")


def test_default_dtype_and_init_match_torch():
    manual_seed(0)
    torch.manual_seed(0)
    lin, lin_t = nn.Linear(400, 300), torch.nn.Linear(400, 300)
    emb, emb_t = nn.Embedding(300, 400), torch.nn.Embedding(300, 400)
    ln, ln_t = nn.LayerNorm(7), torch.nn.LayerNorm(7)
    for name, p in [*lin.named_parameters(), *emb.named_parameters(), *ln.named_parameters()]:
        assert p.dtype == np.float32, f"{name}: new parameters are float32, torch's default dtype"
    bound = 1 / np.sqrt(400)
    for ours, theirs in [(lin.weight, lin_t.weight), (lin.bias, lin_t.bias)]:
        assert np.abs(ours.data).max() <= bound, "Linear init must stay inside ±1/sqrt(in_features)"
        np.testing.assert_allclose(ours.data.std(), theirs.detach().std().item(), rtol=0.1,
                                   err_msg="Linear init spread differs from torch's U(±1/sqrt(in))")
    np.testing.assert_allclose(emb.weight.data.std(), emb_t.weight.detach().std().item(), rtol=0.05,
                               err_msg="Embedding init must be N(0, 1) like torch")
    for name, p in ln.named_parameters():
        np.testing.assert_array_equal(p.data, getattr(ln_t, name).detach().numpy(),
                                      err_msg=f"LayerNorm {name} starts like torch (weight 1, bias 0)")


def test_manual_seed_makes_init_reproducible():
    manual_seed(123)
    a = nn.MLP([3, 4, 2]).state_dict()
    manual_seed(123)
    b = nn.MLP([3, 4, 2]).state_dict()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key}: init must draw from the engine's "
                                                              "default generator, which manual_seed resets")


def test_parameter_count_and_names_equal_torch():
    ours = nn.MLP([784, 512, 512, 10])
    theirs = torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                 torch.nn.ReLU(), torch.nn.Linear(512, 10))
    assert sum(p.data.size for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert list(ours.state_dict()) == list(theirs.state_dict()), "state_dict keys must equal torch's"
    assert [type(m).__name__ for m in ours.modules()][1:] == [type(m).__name__ for m in theirs.modules()][1:]
    assert len(list(ours.children())) == len(list(theirs.children())) == 5


class Tied(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.a, self.b = linear(3, 3), linear(3, 3)
        self.b.weight = self.a.weight


class TorchTied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
        self.b.weight = self.a.weight


def test_tied_weights_are_counted_once_but_saved_under_each_name():
    ours, theirs = Tied(nn.Linear), TorchTied()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()], \
        "a shared Parameter is listed once by named_parameters(), as torch does"
    assert list(ours.state_dict()) == list(theirs.state_dict()), "state_dict keeps every name, as torch does"


def test_state_dict_round_trip_and_copies():
    manual_seed(0)
    source = nn.MLP([4, 6, 3])
    manual_seed(1)
    target = nn.MLP([4, 6, 3])
    sd = source.state_dict()
    target.load_state_dict(sd)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    np.testing.assert_array_equal(target(x).data, source(x).data, err_msg="loaded model must compute the same")
    sd["0.weight"][...] = 0.0
    assert np.abs(source.state_dict()["0.weight"]).sum() > 0, \
        "state_dict() must return copies: editing it must not change the model"
    weight_before = target[0].weight
    target.load_state_dict(source.state_dict())
    assert target[0].weight is weight_before, "loading copies values into the existing Parameters"


def test_load_state_dict_accepts_torch_tensors_and_keeps_dtype():
    theirs = torch.nn.Linear(3, 2).double()
    ours = nn.Linear(3, 2)
    ours.load_state_dict(theirs.state_dict())  # torch tensors straight in, through np.asarray
    assert ours.weight.dtype == np.float32, "loading float64 values into a float32 model keeps float32 (torch)"
    np.testing.assert_allclose(ours.weight.data, theirs.weight.detach().numpy(), rtol=1e-6)


def test_load_state_dict_errors_name_the_keys_and_shapes():
    model = nn.Linear(3, 2)
    good = model.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        model.load_state_dict({"weight": good["weight"]})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        model.load_state_dict({**good, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"'weight'.*\(3, 2\).*\(2, 3\)"):
        model.load_state_dict({**good, "weight": np.zeros((3, 2))})
    np.testing.assert_array_equal(model.weight.data, good["weight"],
                                  err_msg="a failed load must not change any parameter")


def test_load_state_dict_non_strict_reports_like_torch():
    ours, theirs = nn.Linear(3, 2), torch.nn.Linear(3, 2)
    partial = {"weight": np.ones((2, 3), dtype=np.float32), "extra": np.zeros(1, dtype=np.float32)}
    result_t = theirs.load_state_dict({k: torch.from_numpy(v) for k, v in partial.items()}, strict=False)
    result_o = ours.load_state_dict(partial, strict=False)
    assert result_o.missing_keys == result_t.missing_keys
    assert result_o.unexpected_keys == result_t.unexpected_keys
    np.testing.assert_array_equal(ours.weight.data, 1.0, err_msg="keys present are loaded even when not strict")


def test_train_eval_toggles_dropout_everywhere():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Dropout(0.3)))
    assert model.training and all(m.training for m in model.modules()), "modules start in training mode"
    assert model.eval() is model, "eval() returns the module, as torch (allows m = Model().eval())"
    assert not any(m.training for m in model.modules()), "eval() must reach nested modules"
    dropout = model[1][0]
    x = Tensor(np.ones((200, 50), dtype=np.float32))
    np.testing.assert_array_equal(dropout(x).data, x.data, err_msg="Dropout in eval mode is the identity")
    model.train()
    out = dropout(x).data
    assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.7)}, \
        "training Dropout keeps an element scaled by 1/(1-p) or zeroes it"
    assert abs((out == 0).mean() - 0.3) < 0.03, "about a fraction p of elements must be zeroed"


def test_zero_grad_sets_grads_to_none():
    model = nn.MLP([3, 4, 2])
    model(Tensor(np.ones((5, 3), dtype=np.float32))).sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "backward must reach every parameter"
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters()), "zero_grad() sets .grad to None (torch's default)"


def test_repr_matches_torch():
    ours = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3, bias=False), nn.Tanh(), nn.GELU())
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3, bias=False),
                                 torch.nn.Tanh(), torch.nn.GELU(approximate="tanh"))
    assert repr(ours) == repr(theirs)
    assert repr(nn.Embedding(10, 4)) == repr(torch.nn.Embedding(10, 4))


def test_bad_construction_raises():
    with pytest.raises(ValueError) as theirs:
        torch.nn.Dropout(1.5)
    with pytest.raises(ValueError) as ours:
        nn.Dropout(1.5)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="approximate='tanh'"):
        nn.GELU(approximate="none")
    with pytest.raises(ValueError, match="at least an input and an output size"):
        nn.MLP([3])
    with pytest.raises(TypeError, match="argument 1 must be a Module, got int"):
        nn.Sequential(nn.ReLU(), 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.Linear(2, 2).to(np.int64)

    class Forgetful(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2))

    with pytest.raises(AttributeError, match=r"super\(\).__init__\(\)"):
        Forgetful()


def test_layer_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3, 5\)"):
        nn.Linear(5, 3)(Tensor(np.ones((2, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(6,\)"):
        nn.LayerNorm(6)(Tensor(np.ones((2, 5), dtype=np.float32)))


def test_double_casts_parameters():
    model = nn.MLP([3, 4, 2]).double()
    assert all(p.dtype == np.float64 for p in model.parameters()), "double() casts every parameter"
    out = model(Tensor(np.ones((2, 3))))
    assert out.dtype == np.float64
