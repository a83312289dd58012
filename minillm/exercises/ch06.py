"""Checks for chapter 06's exercises. HF Transformers judges every answer inside the check: `GPT2Block`,
`apply_rotary_pos_emb`, `LlamaRMSNorm`, `GPT2LMHeadModel`, `LlamaMLP`, and HF's own parameter count.

The two build exercises are the pre-norm block of GPT-2 (`minillm.models.gpt.Block.forward`) and the rotation of q
and k in Llama (`minillm.models.llama.apply_rope`); `end_to_end_transformer` runs GPT-2 and Llama with whatever is
plugged in beside transformers' eager models (chapter 05's `logits_verdict`)."""

import copy
import logging
import warnings

import torch
import transformers
from transformers.models.llama import modeling_llama

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor
from minillm.exercises.ch05 import U32, _gamma, logits_verdict
from minillm.models import gpt, llama

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

# minillm's own components, kept before any use() swaps them: the bound's Jacobians run on them.
_MINILLM_BLOCK_FORWARD = gpt.Block.forward
_MINILLM_APPLY_ROPE = llama.apply_rope


def _randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


# --- 6.1 (build): GPT-2's pre-norm block ----------------------------------------------------------------------


@exercise("6.1", "GPT-2's pre-norm block", kind="build", component="gpt2_block",
          replaces="minillm.models.gpt:Block.forward", hides=("gpt.Block", "gpt.Block.forward"))
def check_block_forward(block_forward) -> None:
    """Exercise 6.1: `block_forward(self, x, mask, cache=None)` for a minillm `gpt.Block` (`ln_1`, `attn`, `ln_2`,
    `mlp`) loaded from an HF `GPT2Block`, judged by that `GPT2Block` on the same input and mask."""
    g = torch.Generator().manual_seed(61)

    def case(sizes, B, T, pad, why):
        config = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, attn_implementation="eager", n_layer=1,
                                         vocab_size=11, n_positions=16, **sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(61)
            hf = transformers.GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            for name, param in hf.named_parameters():  # LayerNorm scales around 1, everything else around 0
                param.copy_(float(name.endswith("ln_1.weight") or name.endswith("ln_2.weight"))
                            + _randn(g, *param.shape, scale=0.3))
        block = gpt.GPT.from_hf(hf).transformer.h[0]
        x = _randn(g, B, T, sizes["n_embd"])
        real = torch.ones(B, T, dtype=torch.bool)
        real[-1, T - pad:] = False  # right padding in the last sequence: no pad key for anyone
        mask = torch.ones(T, T, dtype=torch.bool).tril() & real[:, None, None, :]  # (B, 1, T, T)
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # HF's form

        def run():
            with torch.no_grad():
                expected = hf.transformer.h[0](x, attention_mask=additive)
                got = expect_tensor(block_forward(block, x.clone(), mask, None), expected, what=why)
            expect_equal(got, expected, what=f"{why}, output [batch, position, channel]", atol=1e-5, rtol=1e-5)
        return run

    cases = [case(dict(n_embd=12, n_head=3), 2, 5, 0, "hidden size 12, 3 heads, causal"),
             case(dict(n_embd=15, n_head=5, n_inner=22), 3, 6, 2, "hidden size 15, 5 heads, right padding")]
    check("6.1", cases,
          hint="pre-norm: each branch (attention, then MLP) reads a normalised copy of x, and its output is added to "
               "x itself; x is never normalised in place",
          more="two residual steps, each of the form x = x + branch(norm(x)), with the block's own norm for each "
               "branch (ln_1 before attention, ln_2 before the MLP). The attention takes the mask and the cache "
               "as they came; the second step must see the x that the first one produced")


def gpt2_block_rounding_bound(output, block, x, *args, **keywords) -> torch.Tensor:
    """How far a correct block's float32 output may round from the exact one: the two residual additions round
    once each (u times the sum); everything inside the branches is minillm's own code, the same on both sides."""
    return U32 * (2 * output.abs() + x.abs())


# --- 6.4 (build): RoPE applied to q and k -----------------------------------------------------------------------


@exercise("6.4", "RoPE on q and k", kind="build", component="apply_rope",
          replaces="minillm.models.llama:apply_rope", hides=("llama.rotate_half", "llama.apply_rope"))
def check_rope(apply_rope) -> None:
    """Exercise 6.4: `apply_rope(x, cos, sin)` rotates x (B, heads, T, hd) in HF's half-split layout, with the
    tables cos, sin (T, hd) of `llama.rope_cos_sin`; judged by HF's `apply_rotary_pos_emb`."""
    g = torch.Generator().manual_seed(62)

    def case(B, H, positions, hd, theta):
        x, positions = _randn(g, B, H, len(positions), hd), torch.tensor(positions)

        def run():
            config = transformers.LlamaConfig(hidden_size=hd, num_attention_heads=1, head_dim=hd,
                                              rope_parameters={"rope_type": "default", "rope_theta": theta})
            cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(x, positions[None])  # (1, T, hd) each
            expected, _ = modeling_llama.apply_rotary_pos_emb(x, x, cos, sin)
            what = f"apply_rope(x of shape {tuple(x.shape)}, positions {positions.tolist()}, theta={theta})"
            got = expect_tensor(apply_rope(x.clone(), cos[0].clone(), sin[0].clone()), expected, what=what)
            expect_equal(got, expected, what=what, atol=1e-6, rtol=1e-6)
        return run

    cases = [case(1, 1, [0, 1, 2, 3, 4], 4, 10000.0), case(2, 3, [7, 8, 9], 6, 500.0),
             case(1, 2, [0, 100, 1000], 10, 10000.0)]
    check("6.4", cases,
          hint="dimension i of a head pairs with dimension i + hd/2 (HF's half-split layout, not neighbours 2i, "
               "2i+1), and each pair (a, b) turns by its angle: (a cos - b sin, b cos + a sin)",
          more="cos and sin already hold every pair's angle twice, in columns i and i + hd/2, so the whole rotation "
               "is elementwise: x times cos, plus a 90°-turned copy of x times sin. The turned copy moves the second "
               "half, negated, to the front and the first half to the back")


def rope_rounding_bound(output, x, cos, sin) -> torch.Tensor:
    """How far a correct rotation's float32 output may round from the exact one: two products and one sum per
    element, in any order: γ_3 (|x cos| + |x_turned sin|) (Higham §3.1; negation is exact)."""
    return _gamma(3) * ((x * cos).abs() + (llama.rotate_half(x) * sin).abs())


def end_to_end_transformer() -> bool:
    """Plug-in verdict for 6.1 and 6.4: GPT-2 and Llama (GQA) logits, with the learner's block and/or rotation
    plugged in, against transformers' eager logits within the rounding bound (chapter 05's `logits_verdict`)."""
    claim = "GPT-2 and Llama (GQA) logits with your block and RoPE equal transformers' eager logits within the rounding bound"
    return logits_verdict(claim, {"gpt2_block": (_MINILLM_BLOCK_FORWARD, gpt2_block_rounding_bound),
                                  "apply_rope": (_MINILLM_APPLY_ROPE, rope_rounding_bound)})


# --- practice ------------------------------------------------------------------------------------------------


@exercise("6.3", "RMSNorm", hides=("llama.RMSNorm",))
def check_rms_norm(rms_norm) -> None:
    """Exercise 6.3: `rms_norm(x, weight, eps)` = x / sqrt(mean(x², last dim) + eps) * weight, as LlamaRMSNorm."""
    g = torch.Generator().manual_seed(61)

    def case(shape, eps, scale, why=""):
        x, weight = _randn(g, *shape, scale=scale), 1.0 + 0.3 * _randn(g, shape[-1])

        def run():
            reference = modeling_llama.LlamaRMSNorm(shape[-1], eps=eps)
            with torch.no_grad():
                reference.weight.copy_(weight)
                expected = reference(x)
            got = rms_norm(x.clone(), weight.clone(), eps)
            expect_equal(got, expected, what=f"rms_norm(x of shape {shape}, eps={eps}){why}", atol=1e-6, rtol=1e-5)
        return run

    cases = [case((2, 5, 7), 1e-6, 1.0), case((3, 1, 16), 1e-5, 50.0, " (large inputs)"),
             case((1, 4, 3), 1e-6, 1e-3, " (tiny inputs: eps matters, and it goes inside the square root)")]
    check("6.3", cases,
          hint="divide by the root of the mean square over the hidden dimension, then scale; no mean is subtracted "
               "and there is no bias",
          more="eps belongs inside the square root, added to the mean of the squares (the tiny-input case tells "
               "the two places apart); keep the last dimension when you average, so the division broadcasts")


@exercise("6.2", "load one GPT-2 layer", hides=("hf._conv1d_names", "hf.gpt_from_hf"))
def check_load_gpt2_block(load_gpt2_block) -> None:
    """Exercise 6.2: `load_gpt2_block(block, hf_block)` copies one HF GPT2Block's weights into a minillm
    `Block`; the model's logits must then equal HF's."""
    from minillm.models import GPT

    def case(sizes, layer):
        def run():
            config = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, attn_implementation="eager", **sizes)
            torch.manual_seed(63 + layer)
            hf = transformers.GPT2LMHeadModel(copy.deepcopy(config)).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    p.normal_(0.0, 0.3)
            ours = GPT.from_hf(hf)
            fresh = GPT(ours.config).transformer.h[layer]  # the same block, randomly initialised
            ours.transformer.h[layer].load_state_dict(fresh.state_dict())
            with torch.no_grad():
                load_gpt2_block(ours.transformer.h[layer], hf.transformer.h[layer])
            ids = torch.randint(0, sizes["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(layer))
            with torch.no_grad():
                expected, got = hf(ids).logits, ours(ids)
            expect_equal(got, expected, what=f"logits after loading layer {layer} of a GPT-2 with "
                         f"hidden size {sizes['n_embd']}", atol=1e-5, rtol=1e-5)
        return run

    cases = [case(dict(vocab_size=37, n_positions=8, n_embd=12, n_layer=2, n_head=3), 1),
             case(dict(vocab_size=50, n_positions=8, n_embd=15, n_layer=3, n_head=5, n_inner=22), 0)]
    check("6.2", cases,
          hint="the names match one to one; some weights are stored the other way round (in, out) by HF's Conv1D. "
               "attn.c_proj is square: its shape cannot tell you it is stored transposed",
          more="decide which tensors to transpose by the type of the HF module that owns them, not by comparing "
               "shapes; biases, LayerNorms and embeddings are never transposed")


@exercise("6.5", "SwiGLU MLP", hides=("llama.SwiGLU",))
def check_swiglu(swiglu) -> None:
    """Exercise 6.5: `swiglu(x, w_gate, w_up, w_down)` with nn.Linear weights (out, in), as LlamaMLP."""
    g = torch.Generator().manual_seed(64)

    def case(shape, intermediate):
        C = shape[-1]
        x = _randn(g, *shape)
        weights = dict(gate_proj=_randn(g, intermediate, C, scale=0.5), up_proj=_randn(g, intermediate, C, scale=0.5),
                       down_proj=_randn(g, C, intermediate, scale=0.5))

        def run():
            config = transformers.LlamaConfig(hidden_size=C, intermediate_size=intermediate, num_attention_heads=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reference = modeling_llama.LlamaMLP(config)
            reference.load_state_dict({f"{name}.weight": w for name, w in weights.items()})
            with torch.no_grad():
                expected = reference(x)
            got = swiglu(x.clone(), weights["gate_proj"].clone(), weights["up_proj"].clone(),
                         weights["down_proj"].clone())
            expect_equal(got, expected, what=f"swiglu(x of shape {shape}, intermediate size {intermediate})",
                         atol=1e-5, rtol=1e-5)
        return run

    cases = [case((2, 3, 6), 10), case((1, 5, 4), 7), case((3, 2, 8), 3)]
    check("6.5", cases,
          hint="two projections of x, one through SiLU (the gate), multiplied elementwise, then projected back "
               "down; the weights are (out, in), as nn.Linear stores them",
          more="the activation goes on the gate projection only, never on the up projection; a weight stored "
               "(out, in) multiplies x from the right after a transpose")


@exercise("6.6", "GPT-2 parameter count")
def check_gpt2_parameter_count(gpt2_parameter_count) -> None:
    """Exercise 6.6: `gpt2_parameter_count(vocab_size, max_seq_len, hidden_size, num_layers)` with the MLP 4x
    wide and tied embeddings, judged by counting the parameters of an HF GPT2LMHeadModel (on the meta device:
    no memory is allocated)."""

    def case(V, T, C, L):
        def run():
            config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=1,
                                             bos_token_id=0, eos_token_id=0)
            with torch.device("meta"):
                expected = sum(p.numel() for p in transformers.GPT2LMHeadModel(config).parameters())
            got = gpt2_parameter_count(V, T, C, L)
            where = f"vocab {V}, {T} positions, hidden {C}, {L} layers"
            if isinstance(got, bool) or not isinstance(got, int):  # None (a forgotten return), a float, a tensor...
                raise Mismatch(f"{where}: expected the int {expected:,}, got {type(got).__name__} {got!r}")
            if got != expected:
                raise Mismatch(f"{where}: expected {expected:,}, got {got:,} (off by {got - expected:+,})")
        return run

    cases = [case(37, 8, 12, 2), case(50257, 1024, 768, 12), case(50257, 1024, 1024, 24)]
    check("6.6", cases,
          hint="add up every weight and bias: the two embedding tables, then per layer two LayerNorms, the "
               "attention's two projections and the MLP's two, then the final LayerNorm. The output layer is tied",
          more="a LayerNorm has a scale and a shift of size C each; every projection has a bias as wide as its "
               "output; c_attn makes q, k and v at once (3C wide); the MLP is 4C wide; a tied output layer adds "
               "no parameters")
