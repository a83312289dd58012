"""Checks for chapter 06's exercises. HF Transformers judges every answer inside the check: `LlamaRMSNorm`,
`LlamaRotaryEmbedding` + `apply_rotary_pos_emb`, `GPT2LMHeadModel`, `LlamaMLP`, and HF's own parameter count."""

import copy
import logging
import warnings

import torch
import transformers
from transformers.models.llama import modeling_llama

from minillm.exercises import Mismatch, check, expect_equal

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)


def _randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def check_rms_norm(rms_norm) -> None:
    """Exercise 6.1: `rms_norm(x, weight, eps)` = x / sqrt(mean(x², last dim) + eps) * weight, as LlamaRMSNorm."""
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
    check("Exercise 6.1 (RMSNorm)", cases,
          hint="x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight: no mean subtraction, no bias, "
               "eps added to the mean square before the root")


def check_rope(apply_rope) -> None:
    """Exercise 6.2: `apply_rope(x, positions, theta)` rotates x (B, heads, T, hd) in HF's half-split layout."""
    g = torch.Generator().manual_seed(62)

    def case(B, H, positions, hd, theta):
        x, positions = _randn(g, B, H, len(positions), hd), torch.tensor(positions)

        def run():
            config = transformers.LlamaConfig(hidden_size=hd, num_attention_heads=1, head_dim=hd,
                                              rope_parameters={"rope_type": "default", "rope_theta": theta})
            cos, sin = modeling_llama.LlamaRotaryEmbedding(config)(x, positions[None])
            expected, _ = modeling_llama.apply_rotary_pos_emb(x, x, cos, sin)
            got = apply_rope(x.clone(), positions.clone(), theta)
            expect_equal(got, expected, what=f"apply_rope(x of shape {tuple(x.shape)}, positions="
                         f"{positions.tolist()}, theta={theta})", atol=2e-4, rtol=1e-4)
        return run

    cases = [case(1, 1, [0, 1, 2, 3, 4], 4, 10000.0), case(2, 3, [7, 8, 9], 6, 500.0),
             case(1, 2, [0, 100, 1000], 10, 10000.0)]
    check("Exercise 6.2 (RoPE)", cases,
          hint="inv_freq = 1 / theta ** (arange(0, hd, 2) / hd); angles = positions[:, None] * inv_freq, then "
               "cat((angles, angles), -1); pair dimension i with i + hd/2 (not 2i with 2i+1): "
               "x * cos + cat((-x2, x1), -1) * sin, where x1, x2 are the two halves of x")


def check_load_gpt2_block(load_gpt2_block) -> None:
    """Exercise 6.3: `load_gpt2_block(block, hf_block)` copies one HF GPT2Block's weights into a minillm
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
    check("Exercise 6.3 (load one GPT-2 layer)", cases,
          hint="copy_ every tensor of hf_block.state_dict() into the same name in block; the four Conv1D weights "
               "(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) need .t(). attn.c_proj is square: its shape "
               "cannot tell you it is stored transposed")


def check_swiglu(swiglu) -> None:
    """Exercise 6.4: `swiglu(x, w_gate, w_up, w_down)` with nn.Linear weights (out, in), as LlamaMLP."""
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
    check("Exercise 6.4 (SwiGLU MLP)", cases,
          hint="down(silu(gate(x)) * up(x)) with F.linear(x, w) = x @ w.T; SiLU is x * sigmoid(x) "
               "(F.silu), and it goes on the gate, not on the up projection")


def check_gpt2_parameter_count(gpt2_parameter_count) -> None:
    """Exercise 6.5: `gpt2_parameter_count(vocab_size, max_seq_len, hidden_size, num_layers)` with the MLP 4x
    wide and tied embeddings, judged by counting the parameters of an HF GPT2LMHeadModel (on the meta device:
    no memory is allocated)."""

    def case(V, T, C, L):
        def run():
            config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=1,
                                             bos_token_id=0, eos_token_id=0)
            with torch.device("meta"):
                expected = sum(p.numel() for p in transformers.GPT2LMHeadModel(config).parameters())
            got = gpt2_parameter_count(V, T, C, L)
            if got != expected:
                raise Mismatch(f"vocab {V}, {T} positions, hidden {C}, {L} layers: expected {expected:,}, "
                               f"got {got:,}" + (f" (off by {got - expected:+,})" if isinstance(got, int) else ""))
        return run

    cases = [case(37, 8, 12, 2), case(50257, 1024, 768, 12), case(50257, 1024, 1024, 24)]
    check("Exercise 6.5 (GPT-2 parameter count)", cases,
          hint="embeddings V*C + T*C (the output layer is tied: no extra V*C); per layer two LayerNorms (2C "
               "each), c_attn C*3C + 3C, attn c_proj C*C + C, c_fc C*4C + 4C, mlp c_proj 4C*C + C; then ln_f 2C")
