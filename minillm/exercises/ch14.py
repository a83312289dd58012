"""Checks for chapter 14's exercises. The references run inside each check: PEFT counts the adapters,
bitsandbytes' `Linear4bit` computes the backward pass, and real tensors after a real AdamW step give the bytes."""

import logging
import warnings

import torch
from torch import nn

from minillm.exercises import Mismatch, check, expect_equal


def _expect_int(got, what: str) -> int:
    if isinstance(got, bool) or not isinstance(got, int):
        raise Mismatch(f"{what}: expected an int, got {type(got).__name__}")
    return got


def check_lora_parameter_count(lora_parameter_count) -> None:
    """Exercise 14.1: `lora_parameter_count(shapes, r)` is how many numbers LoRA of rank r trains on linear
    layers whose weights have the (out_features, in_features) in `shapes`."""
    def case(shapes, r):
        def run():
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            import peft  # imported here: it takes a moment

            model = nn.ModuleDict({f"layer{i}": nn.Linear(inp, out) for i, (out, inp) in enumerate(shapes)})
            config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(model.keys()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected, _ = peft.get_peft_model(model, config).get_nb_trainable_parameters()
            got = _expect_int(lora_parameter_count(list(shapes), r), f"lora_parameter_count({shapes}, r={r})")
            expect_equal(got, expected, what=f"lora_parameter_count({shapes}, r={r})", atol=0, rtol=0)
        return run

    cases = [case([(384, 128)], 8), case([(384, 128), (128, 128), (512, 128), (128, 512)], 8),
             case([(10, 3), (7, 7)], 2), case([(4096, 4096), (11008, 4096)], 64)]
    check("Exercise 14.1 (count LoRA parameters)", cases,
          hint="A is (r, in_features) and B is (out_features, r): r * (in + out) per layer, summed")


def check_linear4bit_backward(linear4bit_backward) -> None:
    """Exercise 14.2: `linear4bit_backward(grad_y, packed, state)` is dL/dx of y = x @ Wᵀ for a 4-bit W,
    computed in grad_y's dtype, as bitsandbytes' `Linear4bit` computes it in its backward."""
    def case(out_features, in_features, x_shape, dtype, double_quant, seed):
        def run():
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            import bitsandbytes as bnb

            from minillm.quant.nf4 import quantize_4bit

            g = torch.Generator().manual_seed(seed)
            weight = torch.randn(out_features, in_features, generator=g) * 0.05
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=double_quant, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=double_quant)
            layer = layer.to("cpu").train()
            x = torch.randn(*x_shape, in_features, generator=g).to(dtype).requires_grad_()
            y = layer(x)  # (..., out_features)
            grad_y = torch.randn(y.shape, generator=g).to(dtype)
            y.backward(grad_y)
            packed, state = quantize_4bit(weight, 64, "nf4", compress_statistics=double_quant)
            got = linear4bit_backward(grad_y.clone(), packed, state)
            what = f"linear4bit_backward for a ({out_features}, {in_features}) weight, grad_y {tuple(grad_y.shape)} {dtype}"
            if not isinstance(got, torch.Tensor) or got.shape != x.grad.shape or got.dtype != x.grad.dtype:
                shown = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
                raise Mismatch(f"{what}: expected a {x.grad.dtype} tensor of shape {tuple(x.grad.shape)}, got {shown}")
            expect_equal(got.float(), x.grad.float(), what=what, atol=1e-6, rtol=1e-5)
        return run

    cases = [case(64, 128, (4,), torch.float32, False, 1), case(96, 64, (2, 5), torch.float32, True, 2),
             case(128, 256, (3,), torch.bfloat16, True, 3)]
    check("Exercise 14.2 (backward through dequantize)", cases,
          hint="dequantize W to grad_y's dtype (minillm.quant.dequantize_4bit(packed, state, dtype=grad_y.dtype)), "
               "then grad_y @ W: (..., out) @ (out, in) -> (..., in)")


def check_qlora_training_bytes(qlora_training_bytes) -> None:
    """Exercise 14.3: `qlora_training_bytes(hidden, intermediate, num_layers, vocab, r)` is the bytes of
    weights + gradients + Adam's m and v when a minillm Llama of those sizes is trained with `qlora` (NF4,
    double quantization, blocksize 64, fp32 adapters on all seven linear layers of each block)."""
    def case(hidden, intermediate, num_layers, vocab, r):
        def run():
            from minillm.models import Llama, LlamaConfig
            from minillm.peft.qlora import qlora

            torch.manual_seed(0)
            model = Llama(LlamaConfig(vocab_size=vocab, max_seq_len=16, hidden_size=hidden, num_layers=num_layers,
                                      num_heads=4, intermediate_size=intermediate))
            qlora(model, r, 2 * r, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params)
            model(torch.randint(0, vocab, (2, 7))).sum().backward()
            optimizer.step()
            nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
            weights = sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])
            gradients = sum(nbytes(p.grad) for p in params)
            adam = sum(nbytes(s["exp_avg"]) + nbytes(s["exp_avg_sq"]) for s in optimizer.state.values())
            args = f"qlora_training_bytes({hidden}, {intermediate}, {num_layers}, {vocab}, r={r})"
            got = _expect_int(qlora_training_bytes(hidden, intermediate, num_layers, vocab, r), args)
            expect_equal(got, weights + gradients + adam, what=f"{args} (measured: weights {weights:,}, "
                         f"gradients {gradients:,}, Adam m and v {adam:,})", atol=0, rtol=0)
        return run

    cases = [case(64, 128, 1, 96, 4), case(64, 160, 2, 50, 8), case(128, 352, 2, 64, 2)]
    check("Exercise 14.3 (QLoRA training memory)", cases,
          hint="4-bit linear: ceil(n/2) + n_blocks + 4 + 4 * ceil(n_blocks / 256) bytes with n_blocks = ceil(n/64); "
               "embedding, head and RMSNorm weights (2 per layer + 1) stay fp32; each adapter r * (in + out) "
               "numbers at 4 bytes, plus 4 for its gradient and 8 for Adam")
