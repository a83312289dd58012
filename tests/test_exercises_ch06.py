"""Chapter 06's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the build
exercises, plugged into minillm, give transformers' logits, and the plug-in leaves nothing behind."""

import pytest
import torch
import torch.nn.functional as TF

from minillm.exercises import ch06, use
from minillm.models import gpt, llama
from exercise_helpers import stub, outputs

CLAIM = ("GPT-2 and Llama (GQA) logits with your block and RoPE equal transformers' eager logits within the rounding "
         "bound")


# --- 6.1 (build) GPT-2's pre-norm block ----------------------------------------------------------------------


def block_forward(self, x, mask, cache=None):
    x = x + self.attn(self.ln_1(x), mask, cache)
    return x + self.mlp(self.ln_2(x))


def post_ln_block(self, x, mask, cache=None):  # the original transformer's order
    x = self.ln_1(x + self.attn(x, mask, cache))
    return self.ln_2(x + self.mlp(x))


def parallel_block(self, x, mask, cache=None):  # both branches read the block's input (GPT-J's layout, not GPT-2's)
    return x + self.attn(self.ln_1(x), mask, cache) + self.mlp(self.ln_2(x))


def test_block_forward_check(capsys):
    for answer in (block_forward, stub, post_ln_block, parallel_block):
        ch06.check_block_forward(answer)
    passed, stubbed, post_ln, parallel = outputs(capsys)
    title = "Exercise 6.1 (GPT-2's pre-norm block)"
    assert passed == f"{title}: passed ✓"
    assert stubbed.startswith(f"{title}: not attempted yet")
    for wrong in (post_ln, parallel):
        assert wrong.startswith(f"{title}: not yet ✗ - case 1: hidden size 12, 3 heads, causal, output [batch, "
                                "position, channel]: first mismatch at index"), wrong


def test_block_and_rope_plugged_in_give_transformers_logits(capsys):
    with use(gpt2_block=block_forward, apply_rope=apply_rope):
        assert ch06.end_to_end_transformer()
    assert capsys.readouterr().out.startswith(f"{CLAIM}, and bit for bit"), "the same ops as HF, in HF's order"


@pytest.mark.parametrize("swap,model", [(dict(gpt2_block=post_ln_block), "GPT-2"),
                                        (dict(apply_rope=lambda x, cos, sin: x * cos - rotate(x) * sin), "Llama")],
                         ids=["post-LN block", "RoPE turning backwards"])
def test_wrong_component_plugged_in_fails_naming_where(swap, model, capsys):
    with use(**swap):
        assert not ch06.end_to_end_transformer()
    out = capsys.readouterr().out
    assert out.startswith(f"{CLAIM}: ✗ - {model}: Σ|Δ| over the real tokens' logits is "), out
    assert "more than the rounding bound" in out and "at real token" in out


def test_stubs_plugged_in_are_skipped(capsys):
    with use(gpt2_block=stub, apply_rope=stub):
        ch06.end_to_end_transformer()
    assert capsys.readouterr().out.startswith("plug-in skipped: your gpt2_block (exercise 6.1), apply_rope "
                                              "(exercise 6.4) is not written yet")


def test_plug_in_leaves_the_models_unchanged():
    torch.manual_seed(0)
    models = [gpt.GPT(gpt.GPTConfig(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=2)),
              llama.Llama(llama.LlamaConfig(vocab_size=32, max_seq_len=16, hidden_size=16, num_layers=2, num_heads=2,
                                            num_kv_heads=1, intermediate_size=24))]
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(1))
    before = [m.eval()(ids) for m in models]
    originals = (gpt.Block.forward, llama.apply_rope)
    for raising in (False, True):
        with pytest.raises(ZeroDivisionError) if raising else torch.no_grad():
            with use(gpt2_block=post_ln_block, apply_rope=apply_rope_interleaved_tables):
                assert gpt.Block.forward is post_ln_block and llama.apply_rope is apply_rope_interleaved_tables
                assert not torch.allclose(models[0](ids), before[0]), "the swapped block never ran"
                if raising:
                    raise ZeroDivisionError
        assert (gpt.Block.forward, llama.apply_rope) == originals
        assert all(torch.equal(m(ids), b) for m, b in zip(models, before))

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
    assert passed == "Exercise 6.3 (RMSNorm): passed ✓"
    assert stubbed.startswith("Exercise 6.3 (RMSNorm): not attempted yet")
    assert eps_outside.startswith("Exercise 6.3 (RMSNorm): not yet ✗ - case 3: rms_norm(x of shape (1, 4, 3), "
                                  "eps=1e-06) (tiny inputs: eps matters"), eps_outside
    assert layer_norm.startswith("Exercise 6.3 (RMSNorm): not yet ✗ - case 1: "), layer_norm
    assert "first mismatch at index" in layer_norm


# --- 6.4 (build) RoPE on q and k ------------------------------------------------------------------------


def rotate(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate(x) * sin


def apply_rope_interleaved_tables(x, cos, sin):  # the RoPE paper's pairing (2i, 2i+1): not HF's layout
    half = x.size(-1) // 2
    c, s = cos[..., :half], sin[..., :half]  # each pair's angle once
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)


def test_rope_check(capsys):
    for answer in (apply_rope, stub, apply_rope_interleaved_tables):
        ch06.check_rope(answer)
    passed, stubbed, interleaved = outputs(capsys)
    assert passed == "Exercise 6.4 (RoPE on q and k): passed ✓"
    assert stubbed.startswith("Exercise 6.4 (RoPE on q and k): not attempted yet")
    assert interleaved.startswith("Exercise 6.4 (RoPE on q and k): not yet ✗ - case 1: apply_rope(x of shape "
                                  "(1, 1, 5, 4), positions [0, 1, 2, 3, 4], theta=10000.0): first mismatch at index "
                                  "(0, 0, 1, "), interleaved  # position 0 is not rotated in any layout


# --- 6.2 load one GPT-2 layer ----------------------------------------------------------------------


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
    assert passed == "Exercise 6.2 (load one GPT-2 layer): passed ✓"
    assert stubbed.startswith("Exercise 6.2 (load one GPT-2 layer): not attempted yet")
    assert by_shape.startswith("Exercise 6.2 (load one GPT-2 layer): not yet ✗ - case 1: logits after loading "
                               "layer 1 of a GPT-2 with hidden size 12: first mismatch"), by_shape
    assert "your code raised RuntimeError" in untransposed, untransposed


def test_load_gpt2_block_check_hint(capsys):
    ch06.check_load_gpt2_block(load_transposing_by_shape)
    assert "attn.c_proj is square" in capsys.readouterr().out


# --- 6.5 SwiGLU ------------------------------------------------------------------------------------


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
    assert passed == "Exercise 6.5 (SwiGLU MLP): passed ✓"
    assert stubbed.startswith("Exercise 6.5 (SwiGLU MLP): not attempted yet")
    for wrong in (swapped, gelu):
        assert wrong.startswith("Exercise 6.5 (SwiGLU MLP): not yet ✗ - case 1: swiglu(x of shape (2, 3, 6), "
                                "intermediate size 10): first mismatch"), wrong


# --- 6.6 parameter count ---------------------------------------------------------------------------


def gpt2_parameter_count(V, T, C, L):
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_layer + 2 * C


def count_with_untied_head(V, T, C, L):
    return gpt2_parameter_count(V, T, C, L) + V * C


def test_parameter_count_check(capsys):
    for answer in (gpt2_parameter_count, stub, count_with_untied_head, lambda *sizes: None,
                   lambda *sizes: float(gpt2_parameter_count(*sizes))):
        ch06.check_gpt2_parameter_count(answer)
    passed, stubbed, untied, forgot_return, as_float = outputs(capsys)
    assert passed == "Exercise 6.6 (GPT-2 parameter count): passed ✓"
    assert stubbed.startswith("Exercise 6.6 (GPT-2 parameter count): not attempted yet")
    assert untied.startswith("Exercise 6.6 (GPT-2 parameter count): not yet ✗ - case 1: vocab 37, 8 positions, "
                             "hidden 12, 2 layers: expected "), untied
    assert untied.endswith(f"(off by +{37 * 12})"), "the untied head adds one more vocab x hidden matrix"
    assert forgot_return == ("Exercise 6.6 (GPT-2 parameter count): not yet ✗ - case 1: vocab 37, 8 positions, "
                             f"hidden 12, 2 layers: expected the int {gpt2_parameter_count(37, 8, 12, 2):,}, got NoneType None"), \
        forgot_return
    assert as_float.startswith("Exercise 6.6 (GPT-2 parameter count): not yet ✗ - case 1: ") and "got float" in as_float
