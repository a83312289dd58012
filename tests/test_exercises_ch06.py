"""Chapter 06's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import torch
import torch.nn.functional as TF

from minillm.exercises import ch06
from exercise_helpers import stub, outputs

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# --- 6.1 RMSNorm -----------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms_norm_eps_outside(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight


def layer_norm_instead(x, weight, eps):
    return TF.layer_norm(x, x.shape[-1:], weight, eps=eps)


def test_rms_norm_check(capsys):
    for answer in (rms_norm, stub, rms_norm_eps_outside, layer_norm_instead):
        ch06.check_rms_norm(answer)
    passed, stubbed, eps_outside, layer_norm = outputs(capsys)
    assert passed == "Exercise 6.1 (RMSNorm): passed ✓"
    assert stubbed.startswith("Exercise 6.1 (RMSNorm): not attempted yet")
    assert eps_outside.startswith("Exercise 6.1 (RMSNorm): not yet ✗ - case 3: rms_norm(x of shape (1, 4, 3), "
                                  "eps=1e-06) (tiny inputs: eps matters"), eps_outside
    assert layer_norm.startswith("Exercise 6.1 (RMSNorm): not yet ✗ - case 1: "), layer_norm
    assert "first mismatch at index" in layer_norm


# --- 6.2 RoPE --------------------------------------------------------------------------------------


def angles(positions, hd, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
    return positions[:, None].float() * inv_freq  # (T, hd/2)


def apply_rope(x, positions, theta):
    a = angles(positions, x.size(-1), theta)
    cos, sin = torch.cat((a, a), -1).cos(), torch.cat((a, a), -1).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def apply_rope_interleaved(x, positions, theta):  # the RoPE paper's pairing (2i, 2i+1): not HF's layout
    a = angles(positions, x.size(-1), theta)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * a.cos() - odd * a.sin()
    out[..., 1::2] = odd * a.cos() + even * a.sin()
    return out


def test_rope_check(capsys):
    for answer in (apply_rope, stub, apply_rope_interleaved):
        ch06.check_rope(answer)
    passed, stubbed, interleaved = outputs(capsys)
    assert passed == "Exercise 6.2 (RoPE): passed ✓"
    assert stubbed.startswith("Exercise 6.2 (RoPE): not attempted yet")
    assert interleaved.startswith("Exercise 6.2 (RoPE): not yet ✗ - case 1: apply_rope(x of shape (1, 1, 5, 4), "
                                  "positions=[0, 1, 2, 3, 4], theta=10000.0): first mismatch at index (0, 0, 1, "), \
        interleaved  # position 0 is not rotated in any layout; position 1 is the first to differ


# --- 6.3 load one GPT-2 layer ----------------------------------------------------------------------


def load_gpt2_block(block, hf_block):
    ours = dict(block.named_parameters())
    for name, tensor in hf_block.state_dict().items():
        ours[name].copy_(tensor.t() if name in CONV1D else tensor)


def load_transposing_by_shape(block, hf_block):  # misses attn.c_proj, which is square
    ours = dict(block.named_parameters())
    for name, tensor in hf_block.state_dict().items():
        ours[name].copy_(tensor.t() if tensor.shape != ours[name].shape else tensor)


def load_without_transposes(block, hf_block):
    ours = dict(block.named_parameters())
    for name, tensor in hf_block.state_dict().items():
        ours[name].copy_(tensor)


def test_load_gpt2_block_check(capsys):
    for answer in (load_gpt2_block, stub, load_transposing_by_shape, load_without_transposes):
        ch06.check_load_gpt2_block(answer)
    passed, stubbed, by_shape, untransposed = outputs(capsys)
    assert passed == "Exercise 6.3 (load one GPT-2 layer): passed ✓"
    assert stubbed.startswith("Exercise 6.3 (load one GPT-2 layer): not attempted yet")
    assert by_shape.startswith("Exercise 6.3 (load one GPT-2 layer): not yet ✗ - case 1: logits after loading "
                               "layer 1 of a GPT-2 with hidden size 12: first mismatch"), by_shape
    assert "your code raised RuntimeError" in untransposed, untransposed


def test_load_gpt2_block_check_hint(capsys):
    ch06.check_load_gpt2_block(load_transposing_by_shape)
    assert "attn.c_proj is square" in capsys.readouterr().out


# --- 6.4 SwiGLU ------------------------------------------------------------------------------------


def swiglu(x, w_gate, w_up, w_down):
    return TF.linear(TF.silu(TF.linear(x, w_gate)) * TF.linear(x, w_up), w_down)


def swiglu_gate_and_up_swapped(x, w_gate, w_up, w_down):
    return TF.linear(TF.silu(TF.linear(x, w_up)) * TF.linear(x, w_gate), w_down)


def gelu_mlp(x, w_gate, w_up, w_down):
    return TF.linear(TF.gelu(TF.linear(x, w_gate)) * TF.linear(x, w_up), w_down)


def test_swiglu_check(capsys):
    for answer in (swiglu, stub, swiglu_gate_and_up_swapped, gelu_mlp):
        ch06.check_swiglu(answer)
    passed, stubbed, swapped, gelu = outputs(capsys)
    assert passed == "Exercise 6.4 (SwiGLU MLP): passed ✓"
    assert stubbed.startswith("Exercise 6.4 (SwiGLU MLP): not attempted yet")
    for wrong in (swapped, gelu):
        assert wrong.startswith("Exercise 6.4 (SwiGLU MLP): not yet ✗ - case 1: swiglu(x of shape (2, 3, 6), "
                                "intermediate size 10): first mismatch"), wrong


# --- 6.5 parameter count ---------------------------------------------------------------------------


def gpt2_parameter_count(V, T, C, L):
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_layer + 2 * C


def count_with_untied_head(V, T, C, L):
    return gpt2_parameter_count(V, T, C, L) + V * C


def test_parameter_count_check(capsys):
    for answer in (gpt2_parameter_count, stub, count_with_untied_head):
        ch06.check_gpt2_parameter_count(answer)
    passed, stubbed, untied = outputs(capsys)
    assert passed == "Exercise 6.5 (GPT-2 parameter count): passed ✓"
    assert stubbed.startswith("Exercise 6.5 (GPT-2 parameter count): not attempted yet")
    assert untied.startswith("Exercise 6.5 (GPT-2 parameter count): not yet ✗ - case 1: vocab 37, 8 positions, "
                             "hidden 12, 2 layers: expected "), untied
    assert untied.endswith(f"(off by +{37 * 12})"), "the untied head adds one more vocab x hidden matrix"
