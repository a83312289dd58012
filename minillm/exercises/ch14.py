"""Checks for chapter 14's exercises. The references run inside each check: bitsandbytes' `Linear4bit` computes
the forward and backward pass, PEFT on bitsandbytes gives the adapter gradients and counts the adapters, and real
tensors after a real AdamW step give the bytes."""

import logging
import warnings

import torch
from torch import nn

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict


def _expect_int(got, what: str) -> int:
    if isinstance(got, bool) or not isinstance(got, int):
        raise Mismatch(f"{what}: expected an int, got {type(got).__name__}")
    return got


def _bnb_linear4bit(weight, bias, compute_dtype, double_quant):
    """bitsandbytes' `Linear4bit` holding `weight` in NF4, in train mode (eval mode differs on some CPUs)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone())
    return layer.to("cpu").train()


# --- 14.1 (build) Linear4bitFunction ------------------------------------------------------------------------


@exercise("14.1", "Linear4bitFunction", kind="build", component="Linear4bitFunction",
          replaces="minillm.quant.linear4bit:Linear4bitFunction", hides=("Linear4bitFunction",))
def check_linear4bit_function(function) -> None:
    """Exercise 14.1: `function.apply(x, bias, layer)` for an `Int4Linear` layer must give bitsandbytes'
    `Linear4bit` output and dL/dx bit for bit (dL/db to rounding), dequantize the weight in the forward and
    again in the backward, and leave no copy of the weight for autograd to keep."""
    from minillm.quant.linear4bit import Int4Linear
    from minillm.quant.nf4 import quantize_4bit

    def case(out_features, in_features, x_shape, dtype, double_quant, with_bias, seed):
        def run():
            g = torch.Generator().manual_seed(seed)
            weight = torch.randn(out_features, in_features, generator=g) * 0.05
            bias = torch.randn(out_features, generator=g) * 0.1 if with_bias else None
            x = torch.randn(*x_shape, in_features, generator=g).to(dtype)
            reference = _bnb_linear4bit(weight, bias, dtype, double_quant)
            x_ref = x.clone().requires_grad_()
            y_ref = reference(x_ref)  # (..., out_features)
            grad_y = torch.randn(y_ref.shape, generator=g).to(dtype)
            y_ref.backward(grad_y)

            layer = Int4Linear(*quantize_4bit(weight, 64, "nf4", double_quant), bias=bias, compute_dtype=dtype)
            dequantize, calls = layer.dequantized_weight, []
            layer.dequantized_weight = lambda: calls.append(1) or dequantize()  # count the dequantizations
            saved = []
            x_in = x.clone().requires_grad_()
            bias_in = None if bias is None else bias.clone().requires_grad_()
            what = (f"{out_features}x{in_features} weight, x {tuple(x.shape)} {str(dtype)[6:]}"
                    f"{', double quantization' if double_quant else ''}{', bias' if with_bias else ''}")
            if not hasattr(function, "apply"):
                raise Mismatch(f"expected a torch.autograd.Function subclass, got {type(function).__name__}")
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
                y = function.apply(x_in, bias_in, layer)
            got = expect_tensor(y, y_ref.detach(), f"{what}: forward")  # checks type, shape and dtype
            expect_equal(got.double(), y_ref.detach().double(), what=f"{what}: forward", atol=0, rtol=0)
            if tuple(weight.shape) in saved:
                raise Mismatch(f"{what}: autograd saved a tensor of the weight's shape {tuple(weight.shape)} for the "
                               "backward, a full-precision copy of the 4-bit weight; keep the layer instead")
            forward_calls = len(calls)
            if forward_calls != 1:
                raise Mismatch(f"{what}: the forward dequantized the weight {forward_calls} times; once is enough")
            if not y.requires_grad:
                raise Mismatch(f"{what}: the output does not require grad; return the result of F.linear from forward")
            y.backward(grad_y)
            if x_in.grad is None:
                raise Mismatch(f"{what}: dL/dx is None; the weight is frozen but x still needs its gradient")
            if len(calls) == forward_calls:
                raise Mismatch(f"{what}: the backward did not dequantize the weight again; it must call "
                               "layer.dequantized_weight() itself rather than keep the forward's copy")
            expect_equal(x_in.grad.double(), x_ref.grad.double(), what=f"{what}: dL/dx", atol=0, rtol=0)
            if with_bias:
                if bias_in.grad is None:
                    raise Mismatch(f"{what}: dL/dbias is None")
                expect_equal(bias_in.grad, reference.bias.grad, what=f"{what}: dL/dbias", atol=1e-6, rtol=1e-5)
        return run

    cases = [case(64, 128, (4,), torch.float32, False, False, 1),
             case(96, 64, (2, 5), torch.float32, True, True, 2),
             case(128, 256, (3,), torch.bfloat16, True, False, 3)]
    check("14.1", cases,
          hint="the forward multiplies by the dequantized weight and keeps only a reference to the layer; the "
               "backward dequantizes once more and returns one gradient per forward input",
          more="dL/dx is dL/dy times W (not its transpose: y = x Wᵀ), with torch.matmul as bitsandbytes uses; "
               "dL/dbias sums dL/dy over every leading dimension; the layer gets None; ctx.needs_input_grad says "
               "which gradients are wanted")


def end_to_end_linear4bit_function() -> bool:
    """The shipped model through `qlora` (every Int4Linear's forward and backward run `Linear4bitFunction`, the
    learner's inside `use(...)`), against PEFT's LoRA on bitsandbytes `Linear4bit` layers holding the same bytes:
    logits and all adapter gradients equal bit for bit. Sound on any CPU: both sides run the same torch ops in
    the same order (bitsandbytes' train-mode `Linear4bit` is `F.linear` on the dequantized weight, and its
    backward `torch.matmul(grad_y, W)`)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import peft
    import torch.nn.functional as F

    from minillm.peft.lora import lora_layers
    from minillm.peft.qlora import bitsandbytes_twin, qlora
    from minillm.pretrained import load_pretrained

    targets, r, alpha = ["c_attn", "c_proj", "c_fc"], 4, 8
    torch.manual_seed(0)
    base, _ = load_pretrained()
    twin = bitsandbytes_twin(base)  # before qlora() quantizes base in place
    ours = qlora(base, r=r, alpha=alpha, target_modules=targets).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(twin, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets)).train()
    generator = torch.Generator().manual_seed(1)
    pairs = {}
    with torch.no_grad():  # B starts at zero; give both sides the same non-zero adapters
        for name, layer in lora_layers(ours).items():
            layer.lora_B.weight.copy_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=generator))
            theirs = reference.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
            pairs[name] = [(layer.lora_A.weight, theirs.lora_A["default"].weight),
                           (layer.lora_B.weight, theirs.lora_B["default"].weight)]
    ids = torch.randint(0, 1024, (3, 21), generator=torch.Generator().manual_seed(2))  # (B, T)
    logits_ours, logits_ref = ours(ids), reference(input_ids=ids).logits  # (B, T, V)
    for logits in (logits_ours, logits_ref):
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    if not torch.equal(logits_ours, logits_ref):
        return verdict(False, CLAIM_14, "the logits differ")
    for name, weights in pairs.items():
        for (mine, theirs), which in zip(weights, "AB"):
            if mine.grad is None or not torch.equal(mine.grad, theirs.grad):
                return verdict(False, CLAIM_14, f"the gradient of {name}'s lora_{which} differs first")
    return verdict(True, CLAIM_14)


CLAIM_14 = ("QLoRA on the shipped model with your Linear4bitFunction: logits and all 32 adapter gradients equal "
            "PEFT's LoRA on bitsandbytes Linear4bit, bit for bit")


# --- practice --------------------------------------------------------------------------------------------


@exercise("14.2", "count LoRA parameters")
def check_lora_parameter_count(lora_parameter_count) -> None:
    """Exercise 14.2: `lora_parameter_count(shapes, r)` is how many numbers LoRA of rank r trains on linear
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
    check("14.2", cases,
          hint="each adapted layer gets two small matrices whose shapes come from the layer's shape and r",
          more="A maps in_features to r numbers and B maps r numbers to out_features; count both, for every layer")


@exercise("14.3", "QLoRA training memory")
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
    check("14.3", cases,
          hint="add up three kinds of tensors: the 4-bit layers with their scales, the weights that stay fp32, and "
               "the adapters with their gradients and Adam's two moments",
          more="a 4-bit layer stores its packed codes, one 8-bit absmax code per block of 64, an fp32 offset and one "
               "fp32 scale per 256 blocks; chapter 12 counted these; the embedding, the output head and every "
               "RMSNorm weight stay fp32")
