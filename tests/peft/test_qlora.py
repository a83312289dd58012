"""minillm.peft.qlora against PEFT's LoRA on bitsandbytes' `Linear4bit`, and the memory arithmetic.

The reference (`bitsandbytes_twin`): the same pretrained weights as a transformers GPT-2 or Llama
(`model.to_hf()`), every linear layer but the head replaced by a bitsandbytes `Linear4bit` quantized by
bitsandbytes itself from the same fp32 weight, and PEFT's LoRA on top (PEFT picks its bitsandbytes LoRA layer
when the model says `is_loaded_in_4bit`). Chapter 12
showed our `quantize_4bit` gives bitsandbytes' bytes; each test asserts it again for the layers it uses, so
both sides dequantize to the same weights.

Why the comparison can be exact: in train mode `Linear4bit` on CPU is `F.linear(x, dequantize(W), b)` in the
compute dtype, and its backward (`MatMul4Bit`) is `grad @ dequantize(W)`, the same torch ops `Int4Linear`
runs; minillm's GPT equals HF's eager GPT-2 op for op (chapter 06) and `LoRALinear` equals PEFT's bitsandbytes
LoRA layer op for op (chapter 09). So logits, loss and adapter gradients are compared with `torch.equal`, in
fp32 and in bf16 compute. Eval mode is not compared: on AVX512-BF16 CPUs `Linear4bit` then repacks its
weight and runs a bf16 kernel (see tests/quant/test_linear4bit.py), and the twin is kept in train mode
throughout (the model has no dropout, so train mode changes nothing else).
"""

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # before peft imports it
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
bnb_F = pytest.importorskip("bitsandbytes.functional")

from minillm.models import GPT, GPTConfig, Llama, LlamaConfig  # noqa: E402
from minillm.peft.adapters import load_adapter, save_adapter  # noqa: E402
from minillm.peft.lora import LoRALinear, lora_layers  # noqa: E402
from minillm.peft.qlora import (METHODS, ModelShapes, TrainingMemory, bitsandbytes_twin,  # noqa: E402
                                estimate_training_memory,
                                llama_shapes, measure_training_memory, model_shapes, prepare_for_kbit_training,
                                qlora, quantized_bytes)
from minillm.pretrained import load_pretrained  # noqa: E402
from minillm.quant.linear4bit import Int4Linear, quantize_model  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]  # every linear layer of a GPT-2 block, as the QLoRA paper does
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shipped_gpt():
    return load_pretrained()[0]


def tiny_llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=1024, max_seq_len=32, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=128))


def peft_model(hf, r=8, alpha=16, targets=TARGETS):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(hf, config).train()


def assert_same_4bit_bytes(ours: nn.Module, twin: nn.Module) -> None:
    for name, layer in ours.named_modules():
        if isinstance(layer, Int4Linear):
            ref = twin.get_submodule(name.removesuffix(".base"))
            ref = getattr(ref, "base_layer", ref)
            assert torch.equal(layer.weight_packed, ref.weight.data), \
                f"{name}: our packed bytes differ from bitsandbytes'; chapter 12's quantize_4bit must match first"


def peft_lora(pm, name: str):
    """PEFT's (lora_A, lora_B) nn.Linear pair for the layer our model calls `name` (ours ends in `.base`)."""
    layer = pm.base_model.model.get_submodule(name)
    return layer.lora_A["default"], layer.lora_B["default"]


def make_pair(quant_type="nf4", double_quant=True, compute_dtype=torch.float32, r=8, alpha=16,
              make_model=shipped_gpt, targets=TARGETS):
    """(our QLoRA model, PEFT + bitsandbytes twin) with equal base bytes and equal, non-zero adapters."""
    base = make_model()
    twin = peft_model(bitsandbytes_twin(base, quant_type=quant_type, double_quant=double_quant,
                                        compute_dtype=compute_dtype), r, alpha, targets)
    ours = qlora(base, r, alpha, targets, quant_type=quant_type, double_quant=double_quant,
                 compute_dtype=compute_dtype).train()
    assert_same_4bit_bytes(ours, twin.base_model.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            # B starts at zero; give it values so that A gets a gradient and the update shows in the logits.
            layer.lora_B.weight.copy_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=generator))
            A, B = peft_lora(twin, name)
            A.weight.copy_(layer.lora_A.weight)
            B.weight.copy_(layer.lora_B.weight)
    return ours, twin


def token_batch(seed=2, shape=(3, 21)):
    return torch.randint(0, 1024, shape, generator=torch.Generator().manual_seed(seed))  # (B, T)


def assert_equal(ours, theirs, what):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, \
        f"{what}: got {ours.dtype} {tuple(ours.shape)}, expected {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        pytest.fail(f"{what}: {int((ours != theirs).sum())} of {ours.numel()} differ, max|Δ| = "
                    f"{(ours.float() - theirs.float()).abs().max().item():.3g}; the ops or their order differ "
                    "from PEFT's bitsandbytes LoRA layer (see the module docstring)")


# ------------------------------------------------------------------------ against PEFT + bitsandbytes
@pytest.mark.parametrize("quant_type,double_quant,compute_dtype,make_model,targets", [
    ("nf4", True, torch.float32, shipped_gpt, TARGETS), ("nf4", True, torch.bfloat16, shipped_gpt, TARGETS),
    ("fp4", False, torch.float32, shipped_gpt, TARGETS), ("nf4", True, torch.float32, tiny_llama, LLAMA_TARGETS)],
    ids=["gpt-nf4-dq-fp32", "gpt-nf4-dq-bf16", "gpt-fp4-fp32", "llama-nf4-dq-fp32"])
def test_logits_and_adapter_gradients_equal_peft_on_bitsandbytes(quant_type, double_quant, compute_dtype,
                                                                 make_model, targets):
    ours, twin = make_pair(quant_type, double_quant, compute_dtype, make_model=make_model, targets=targets)
    ids = token_batch()
    logits_ours, logits_ref = ours(ids), twin(input_ids=ids).logits  # (B, T, V)
    assert_equal(logits_ours, logits_ref, f"logits ({quant_type}, double quant {double_quant}, {compute_dtype})")
    loss_ours = F.cross_entropy(logits_ours[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss_ref = F.cross_entropy(logits_ref[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss_ours.backward()
    loss_ref.backward()
    for name, layer in lora_layers(ours).items():
        A, B = peft_lora(twin, name)
        assert_equal(layer.lora_A.weight.grad, A.weight.grad, f"{name}: gradient of lora_A")
        assert_equal(layer.lora_B.weight.grad, B.weight.grad, f"{name}: gradient of lora_B")


def test_gradients_reach_only_the_adapters():
    ours = qlora(shipped_gpt(), 8, 16, TARGETS).train()
    ours(token_batch()).sum().backward()
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    with_grad = {name for name, p in ours.named_parameters() if p.grad is not None}
    assert trainable == with_grad, "every trainable parameter, and nothing else, should get a gradient"
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), \
        f"only lora_A / lora_B should train after qlora(), got {sorted(trainable)[:5]}"
    plain = {n for n, m in ours.named_modules()
             if isinstance(m, nn.Linear) and n != "lm_head" and not n.endswith((".lora_A", ".lora_B"))}
    assert not plain, f"every nn.Linear but lm_head should have become an Int4Linear, left {sorted(plain)}"


def test_adapters_move_between_minillm_and_peft_on_the_bitsandbytes_twin(tmp_path):
    ours, twin = make_pair()
    ids = token_batch(seed=3)

    # minillm -> PEFT: save_adapter, then PeftModel.from_pretrained on a fresh bitsandbytes twin.
    save_adapter(ours, tmp_path / "minillm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(bitsandbytes_twin(shipped_gpt()), tmp_path / "minillm").train()
    with torch.no_grad():
        assert_equal(ours(ids), loaded(input_ids=ids).logits, "logits: minillm QLoRA vs PEFT with our saved adapter")

    # PEFT -> minillm: an adapter changed on the PEFT side, saved by PEFT, loaded by load_adapter into the
    # quantized, prepared base (load_adapter adds the adapters itself, so the base must have none).
    with torch.no_grad():
        for name in lora_layers(ours):
            A, _ = peft_lora(twin, name)
            A.weight.mul_(-1.5)
    twin.save_pretrained(tmp_path / "peft")
    fresh = prepare_for_kbit_training(quantize_model(shipped_gpt(), "nf4", compress_statistics=True))
    load_adapter(fresh.train(), tmp_path / "peft")
    with torch.no_grad():
        assert_equal(fresh(ids), twin(input_ids=ids).logits, "logits: PEFT's adapter loaded into minillm QLoRA")


# ------------------------------------------------------------------------------- the 4-bit backward
def test_backward_keeps_only_the_4bit_bytes():
    # Everything autograd saves for the backward of one Int4Linear: no (out, in) float weight among it.
    layer = Int4Linear.from_linear(nn.Linear(128, 96), compress_statistics=True)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    shapes = [tuple(t.shape) for t in saved]
    assert (96, 128) not in shapes, (f"autograd kept a dequantized weight {shapes}: Int4Linear's forward must go "
                                     "through Linear4bitFunction, which dequantizes again in the backward")
    reference = x.detach().clone().requires_grad_()
    F.linear(reference, layer.dequantized_weight(), layer.bias.detach()).sum().backward()
    assert_equal(x.grad, reference.grad, "dL/dx of Int4Linear vs F.linear with the dequantized weight")


def test_dequantize_kernel_gives_the_same_weight():
    # On a GPU Int4Linear dequantizes with chapter 13's Triton kernel; here the kernel runs in the interpreter.
    kernels = pytest.importorskip("minillm.quant.kernels")
    layer = Int4Linear.from_linear(nn.Linear(128, 256), compress_statistics=True, compute_dtype=torch.bfloat16)
    got = kernels.dequantize_4bit(layer.weight_packed, layer.quant_state, out_dtype=torch.bfloat16)
    assert_equal(got, layer.dequantized_weight(), "Triton dequantize_4bit vs Int4Linear's torch dequantize")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the Triton path runs only there")
def test_cuda_forward_equals_cpu_forward():
    layer = Int4Linear.from_linear(nn.Linear(256, 128), compress_statistics=True)
    x = torch.randn(5, 256)
    expected = layer(x)
    got = copy.deepcopy(layer).cuda()(x.cuda()).cpu()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), \
        "CUDA forward (Triton dequantize + cuBLAS) should match the CPU one up to matmul summation order"


# ------------------------------------------------------------------------------ prepare_for_kbit_training
def test_prepare_casts_half_precision_to_fp32_and_freezes():
    model = GPT(GPTConfig(vocab_size=64, max_seq_len=16, hidden_size=64, num_layers=1, num_heads=2)).to(torch.bfloat16)
    qlora(model, 4, 8, ["c_attn"], compute_dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert set(dtypes.values()) == {torch.float32}, \
        f"norms, embeddings, biases and adapters should be fp32 after prepare_for_kbit_training, got {dtypes}"
    frozen_norm = model.transformer.ln_f.weight
    assert not frozen_norm.requires_grad, "prepare_for_kbit_training freezes everything but the adapters"
    logits = model(torch.randint(0, 64, (2, 5)))  # (B, T, V)
    assert logits.dtype == torch.float32, "the residual stream stays fp32; only the 4-bit matmuls run in bf16"


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = token_batch(shape=(2, 9))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = qlora(load_pretrained()[0], 8, 16, ["c_attn"], gradient_checkpointing=checkpointing).train()
        assert model.gradient_checkpointing == checkpointing
        embedding_out = model.transformer.wte(ids)
        assert embedding_out.requires_grad == checkpointing, \
            "with gradient checkpointing the token embedding's output should require grad (the input-grad hook)"
        model(ids).sum().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads):
        assert_equal(checkpointed, plain, "adapter gradient with vs without gradient checkpointing")


def test_input_grad_hook_is_what_reentrant_checkpointing_needs():
    # A layer checkpointed with use_reentrant=True behind a frozen embedding: without the hook the checkpoint
    # sees no input that requires grad, records no graph, and the adapter inside can never get a gradient.
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 64)
            self.proj = nn.Linear(64, 64)
            self.gradient_checkpointing = False

        def forward(self, ids):
            return torch.utils.checkpoint.checkpoint(self.proj, self.wte(ids), use_reentrant=True)

    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no input requires grad
        without_hook = qlora(Tiny(), 2, 4, ["proj"], skip=())(ids)
    assert not without_hook.requires_grad, "without the hook a reentrant checkpoint should record no graph"
    with_hook = qlora(Tiny(), 2, 4, ["proj"], skip=(), gradient_checkpointing=True)
    with_hook(ids).sum().backward()
    assert with_hook.proj.lora_A.weight.grad is not None, \
        "with the input-grad hook the adapter inside a reentrant checkpoint should get a gradient"


# ------------------------------------------------------------------------------------------ memory
def train_one_step(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(token_batch()).sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("method,options", [("full", {}), ("lora", {}), ("qlora", {}),
                                            ("qlora", {"double_quant": False, "blocksize": 128})])
def test_memory_formula_equals_measured_bytes(method, options):
    model, _ = load_pretrained()
    shapes = model_shapes(model)
    if method == "lora":
        from minillm.peft.lora import add_lora
        add_lora(model, 8, 16, TARGETS)
    elif method == "qlora":
        qlora(model, 8, 16, TARGETS, **options)
    measured = measure_training_memory(model, train_one_step(model))
    estimated = estimate_training_memory(shapes, method, r=8, **options)
    assert measured == estimated, (f"{method} {options}: measured {measured} vs formula {estimated}; the formula "
                                   "must count exactly the tensors a training step keeps")


def test_quantized_bytes_equals_bitsandbytes_tensors():
    for numel, blocksize, double_quant in [(4096, 64, True), (1000, 64, True), (64 * 256 * 3 + 5, 64, True),
                                           (777, 32, False), (128 * 512, 128, False)]:
        packed, state = bnb_F.quantize_4bit(torch.randn(numel), blocksize=blocksize, quant_type="nf4",
                                            compress_statistics=double_quant)
        tensors = [packed, state.absmax] + ([state.offset, state.state2.absmax] if double_quant else [])
        expected = sum(t.numel() * t.element_size() for t in tensors)
        assert quantized_bytes(numel, blocksize, double_quant) == expected, \
            f"quantized_bytes({numel}, {blocksize}, {double_quant}) should count bitsandbytes' {expected} bytes"


def test_llama_shapes_match_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config)
    shapes = llama_shapes(64, 160, 2, 96, num_kv_heads=2, num_heads=4)
    assert shapes.num_parameters == sum(p.numel() for p in hf.parameters()), "parameter count differs from HF Llama"
    hf_linears = [tuple(m.weight.shape) for n, m in hf.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted(shapes.linears) == sorted(hf_linears), "linear layer shapes differ from HF Llama's"


def test_full_finetuning_of_65b_needs_the_papers_780_gb():
    # QLoRA paper: "more than 780 GB" for 16-bit full fine-tuning of LLaMA 65B; bf16 weights and gradients plus
    # fp32 Adam state is 12 bytes per parameter.
    memory = estimate_training_memory(llama_shapes(8192, 22016, 80, 32000), "full", weight_bytes=2)
    assert 780e9 < memory.total < 790e9, f"65B full fine-tuning: {memory.total / 1e9:.1f} GB"


# ---------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    with pytest.raises(ValueError, match=r"qlora: a 4-bit base needs a compute_dtype"):
        qlora(load_pretrained()[0], 8, 16, TARGETS, compute_dtype=None)
    with pytest.raises(ValueError, match=r"qlora: compute_dtype must be one of"):
        qlora(load_pretrained()[0], 8, 16, TARGETS, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"qlora: quant_type must be one of \('nf4', 'fp4'\)"):
        qlora(load_pretrained()[0], 8, 16, TARGETS, quant_type="int4")
    with pytest.raises(TypeError, match=r"double_quant must be True or False"):
        qlora(load_pretrained()[0], 8, 16, TARGETS, double_quant="yes")
    with pytest.raises(ValueError, match=r"no linear layer of this GPT is named \['q_proj'\]"):
        qlora(load_pretrained()[0], 8, 16, ["q_proj"])
    with pytest.raises(TypeError, match=r"prepare_for_kbit_training: expected an nn.Module"):
        prepare_for_kbit_training("model")
    with pytest.raises(ValueError, match=r"has no `gradient_checkpointing` flag"):
        prepare_for_kbit_training(nn.Sequential(nn.Embedding(4, 4)), gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"Int4Linear: compute_dtype must be one of .* got None; 4-bit codes"):
        Int4Linear.from_linear(nn.Linear(64, 8), compute_dtype=None)
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"take one optimizer.step\(\) first"):
        measure_training_memory(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match=r"expected a torch.optim.Optimizer"):
        measure_training_memory(model, None)
    shapes = ModelShapes([(8, 8)])
    with pytest.raises(ValueError, match=r"method must be one of \('full', 'lora', 'qlora'\), got 'dora'"):
        estimate_training_memory(shapes, "dora")
    with pytest.raises(ValueError, match=r"r must be an int >= 1"):
        estimate_training_memory(shapes, "lora", r=0)
    with pytest.raises(ValueError, match=r"blocksize must be one of"):
        estimate_training_memory(shapes, "qlora", blocksize=100)
    assert METHODS == ("full", "lora", "qlora") and isinstance(estimate_training_memory(shapes, "full"), TrainingMemory)
