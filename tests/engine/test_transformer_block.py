"""minillm.engine.transformer.Block against a torch twin written here with plain torch ops.

The twin uses the same parameter names, so our Block loads its state_dict 1:1; in float64 the output,
the input gradient and every parameter gradient must agree to 1e-10.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from minillm.engine import Tensor, transformer

B, T, D, HEADS = 2, 5, 16, 4


class TorchCausalSelfAttention(torch.nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.c_attn = torch.nn.Linear(d_model, 3 * d_model)
        self.c_proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-2, -1) / math.sqrt(c // self.num_heads)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        att = TF.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class TorchFeedForward(torch.nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.c_fc = torch.nn.Linear(d_model, 4 * d_model)
        self.c_proj = torch.nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.c_proj(TF.gelu(self.c_fc(x), approximate="tanh"))


class TorchBlock(torch.nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(d_model)
        self.attn = TorchCausalSelfAttention(d_model, num_heads)
        self.ln_2 = torch.nn.LayerNorm(d_model)
        self.mlp = TorchFeedForward(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def make_twins(seed=0):
    torch.manual_seed(seed)
    theirs = TorchBlock(D, HEADS).double()
    with torch.no_grad():  # LayerNorm starts at ones/zeros; random values make every parameter count
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = transformer.Block(D, HEADS).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_parameter_names_match_the_torch_twin():
    ours, theirs = make_twins()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()], \
        "Block parameter names/order must follow GPT-2 (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, ...)"


def test_block_forward_and_all_gradients_match_torch():
    ours, theirs = make_twins()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, D))
    upstream = rng.standard_normal((B, T, D))

    x_t = torch.tensor(x, requires_grad=True)
    out_t = theirs(x_t)
    (out_t * torch.from_numpy(upstream)).sum().backward()

    x_o = Tensor(x.copy(), requires_grad=True)
    out_o = ours(x_o)
    assert out_o.shape == (B, T, D), f"Block must keep the shape (B, T, C) = {(B, T, D)}, got {out_o.shape}"
    (out_o * Tensor(upstream)).sum().backward()

    np.testing.assert_allclose(out_o.data, out_t.detach().numpy(), rtol=1e-10, atol=1e-10,
                               err_msg="Block output differs from the torch twin")
    np.testing.assert_allclose(x_o.grad, x_t.grad.numpy(), rtol=1e-10, atol=1e-10,
                               err_msg="gradient with respect to the block's input differs")
    grads_t = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"{name}.grad is None: backward did not reach it"
        np.testing.assert_allclose(p.grad, grads_t[name].grad.numpy(), rtol=1e-10, atol=1e-10,
                                   err_msg=f"gradient of {name} differs from the torch twin")


def test_causal_mask_hides_the_future():
    ours, _ = make_twins()
    x = np.random.default_rng(1).standard_normal((B, T, D))
    changed = x.copy()
    changed[:, -1] += 10.0  # change only the last token
    out, out_changed = ours(Tensor(x)).data, ours(Tensor(changed)).data
    np.testing.assert_allclose(out_changed[:, :-1], out[:, :-1], rtol=0, atol=1e-12,
                               err_msg="earlier positions changed when a later token changed: "
                                       "the attention mask lets the future leak in")
    assert not np.allclose(out_changed[:, -1], out[:, -1]), "the changed position itself must change"


def test_float32_block_stays_float32():
    block = transformer.Block(D, HEADS)
    out = block(Tensor(np.random.default_rng(2).standard_normal((B, T, D)).astype(np.float32)))
    assert out.dtype == np.float32, f"a float32 block on float32 input must stay float32, got {out.dtype}"
    out.sum().backward()
    assert all(p.grad.dtype == np.float32 for p in block.parameters()), "gradients keep the parameters' dtype"


def test_parameter_count_equals_torch():
    ours, theirs = make_twins()
    assert sum(p.data.size for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="d_model=10 must be divisible by num_heads=4"):
        transformer.CausalSelfAttention(10, 4)
