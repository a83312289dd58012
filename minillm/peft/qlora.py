"""QLoRA: LoRA adapters trained on top of a frozen base whose linear layers are stored in 4 bits.

Chapter 14 teaches this module. QLoRA (Dettmers et al., 2023, arXiv:2305.14314) puts four pieces together,
all of which the course builds:

1. NF4 weights (chapter 12's `quantize_4bit`, inside `Int4Linear`), dequantized to a compute dtype on every
   forward and again in the backward (`Linear4bitFunction`), so that only 4-bit bytes stay in memory;
2. double quantization of the blocks' scales (chapter 12): 0.373 bits per parameter less;
3. LoRA adapters beside each quantized layer (chapter 09's `add_lora`): the only weights that train, so the
   only ones with gradients and optimizer state;
4. paged optimizers (chapter 15), which move optimizer state to CPU memory when the GPU runs short.

    model = qlora(model, r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    # every nn.Linear but lm_head is now NF4 + double quantization, every target has an fp32 adapter

Checked against PEFT's LoRA on bitsandbytes `Linear4bit` layers holding the same 4-bit bytes (tests/peft/
test_qlora.py): logits and adapter gradients are bitwise equal in train mode. The second half of the file
counts memory: `measure_training_memory` from the tensors of a real training step, `estimate_training_memory`
from shapes alone, exactly equal on our model and then applied to LLaMA 7B and 65B.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from minillm.peft.lora import add_lora
from minillm.quant.blockwise import FLOAT_DTYPES
from minillm.quant.linear4bit import quantize_model
from minillm.quant.nf4 import BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, QUANT_TYPES


# --------------------------------------------------------------------------------- preparing a model
def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """Get a (quantized) model ready for adapters, as PEFT's `prepare_model_for_kbit_training`; in place.

    Chapter 14 teaches this. Three things:

    - freeze every parameter (the adapters, added afterwards, are the only ones to train);
    - cast every fp16 / bf16 parameter to fp32: the norms, embeddings and biases that were not quantized
      are a small part of the model, and layer norms in half precision are a known source of unstable
      training. The residual stream then stays fp32; only the 4-bit matmuls run in their compute dtype;
    - with `gradient_checkpointing=True`, turn on the model's checkpointing (minillm's `gradient_checkpointing`
      flag, chapter 06) and make the token embedding's output require grad. Reentrant checkpointing
      (`use_reentrant=True`, HF's long-time default) drops the graph of a block whose inputs do not require
      grad, and with a frozen embedding none does, so the adapters inside would get no gradient. minillm's
      own checkpointing is non-reentrant and does not need this; other models may.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_for_kbit_training: expected an nn.Module, got {type(model).__name__}")
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError(f"prepare_for_kbit_training: a {type(model).__name__} has no `gradient_checkpointing` "
                             "flag; gradient_checkpointing=True needs a minillm model (GPT, Llama)")
        model.gradient_checkpointing = True
        _input_embedding(model).register_forward_hook(_make_output_require_grad)
    return model


def _input_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding: the first `nn.Embedding` registered (`wte` in GPT, `embed_tokens` in Llama)."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module
    raise ValueError(f"prepare_for_kbit_training: a {type(model).__name__} has no nn.Embedding to make its output "
                     "require grad")


def _make_output_require_grad(module: nn.Module, inputs, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def qlora(model: nn.Module, r: int, alpha: float, target_modules, *, quant_type: str = "nf4",
          double_quant: bool = True, compute_dtype: torch.dtype | None = torch.float32, blocksize: int = 64,
          dropout: float = 0.0, use_rslora: bool = False, skip: tuple[str, ...] = ("lm_head",),
          gradient_checkpointing: bool = False) -> nn.Module:
    """Quantize `model`'s linear layers to 4 bits and add LoRA adapters to `target_modules`; in place.

    Chapter 14 teaches this. Three steps, in QLoRA's order:
    `quantize_model(model, quant_type, skip=skip, blocksize=..., compress_statistics=double_quant,
    compute_dtype=...)` (every `nn.Linear` not in `skip` becomes an `Int4Linear`; layers already quantized
    stay as they are), `prepare_for_kbit_training(model, gradient_checkpointing)`, then
    `add_lora(model, r, alpha, target_modules, dropout, use_rslora)`. Returns the model: gradients reach
    only the adapters. The QLoRA paper trains adapters on every linear layer and uses bf16 as compute dtype
    on GPUs; on a CPU fp32 is both faster and exact.

    `compute_dtype` has no default of None on purpose: 4-bit codes are not numbers a matmul can use, every
    forward dequantizes them to this dtype, and guessing it from the input (as bitsandbytes does when it is
    left out) silently trains in a different precision than the one you meant.
    """
    if compute_dtype is None:
        raise ValueError(f"qlora: a 4-bit base needs a compute_dtype, one of {FLOAT_DTYPES}: every forward "
                         "dequantizes the weights to it (QLoRA uses torch.bfloat16 on GPUs; torch.float32 is "
                         "exact and fastest on a CPU)")
    if compute_dtype not in FLOAT_DTYPES:
        raise ValueError(f"qlora: compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"qlora: quant_type must be one of {QUANT_TYPES} (QLoRA uses 'nf4'), got {quant_type!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"qlora: double_quant must be True or False, got {double_quant!r}")
    quantize_model(model, quant_type, skip=skip, blocksize=blocksize, compress_statistics=double_quant,
                   compute_dtype=compute_dtype)
    prepare_for_kbit_training(model, gradient_checkpointing)
    return add_lora(model, r, alpha, target_modules, dropout=dropout, use_rslora=use_rslora)


# ----------------------------------------------------------------------------------- the reference
def bitsandbytes_twin(model: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                      compute_dtype: torch.dtype = torch.float32, blocksize: int = 64):
    """The reference QLoRA is checked against: `model.to_hf()` with every HF `Conv1D` / `nn.Linear` but the
    output head replaced by a bitsandbytes `Linear4bit`, quantized by bitsandbytes from the same weight.

    Chapter 14 and tests/peft/test_qlora.py use it. Pass the model *before* `qlora` quantizes it. The twin is
    in train mode (on CPUs with AVX512-BF16 `Linear4bit`'s eval mode switches to a bf16 kernel) and says
    `is_loaded_in_4bit`, as a model loaded with a `BitsAndBytesConfig` does, so `peft.get_peft_model` wraps
    its layers in PEFT's bitsandbytes LoRA layers. bitsandbytes quantizes exactly as chapter 12's
    `quantize_4bit` (same bytes), so both sides hold the same 4-bit weights.
    """
    import bitsandbytes as bnb  # imported here: only the checks need bitsandbytes and transformers
    from transformers.pytorch_utils import Conv1D

    hf = model.to_hf()
    for name, module in list(hf.named_modules()):
        if name == "lm_head" or not isinstance(module, (Conv1D, nn.Linear)):
            continue
        # Conv1D stores its weight (in, out); Linear4bit, like nn.Linear, wants (out, in).
        weight = module.weight.detach().t().contiguous() if isinstance(module, Conv1D) else module.weight.detach()
        layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type,
                                         blocksize=blocksize, compress_statistics=double_quant)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent), child, layer.to("cpu"))  # moving a Params4bit quantizes it
    hf.is_loaded_in_4bit = True
    return hf.train()


# ------------------------------------------------------------------------------------- memory, measured
@dataclass
class TrainingMemory:
    """Bytes that a training step keeps between steps: weights, gradients and optimizer state.

    Activations (what the forward saves for the backward) are not in it: they depend on batch size and
    sequence length, not on the method, and live only during a step. Chapter 14 measures them separately.
    """

    weights: int  # every parameter and buffer: frozen, quantized (packed bytes and their scales) and trainable
    gradients: int  # the .grad of every trainable parameter
    optimizer_state: int  # every tensor the optimizer keeps (Adam: m, v and a step count per parameter)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def measure_training_memory(model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingMemory:
    """Count the bytes of `model`'s tensors and `optimizer`'s state, after at least one step. Chapter 14.

    Counted from the real tensors, each once (a tied embedding and head is one tensor). Call it after a
    backward and an optimizer step, when gradients and state exist.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"measure_training_memory: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not optimizer.state:
        raise ValueError("measure_training_memory: the optimizer has no state yet; take one optimizer.step() first")
    weights = sum(_nbytes(t) for t in [*model.parameters(), *model.buffers()])
    gradients = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    optimizer_state = sum(_nbytes(value) for state in optimizer.state.values() for value in state.values()
                          if isinstance(value, torch.Tensor))
    return TrainingMemory(weights, gradients, optimizer_state)


# ------------------------------------------------------------------------------------ memory, estimated
@dataclass
class ModelShapes:
    """What the memory formula needs to know about a model: its linear layers and everything else.

    `linears` are the (out_features, in_features) of the layers QLoRA quantizes and LoRA adapts (every linear
    layer but the output head, as in the QLoRA paper); `others` the sizes of every other parameter tensor
    (embeddings, norms, biases, an untied output head), which stay in 16 or 32 bits.
    """

    linears: list[tuple[int, int]]
    others: list[int] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return sum(out * inp for out, inp in self.linears) + sum(self.others)


def model_shapes(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> ModelShapes:
    """`ModelShapes` of a minillm model (before quantization): its `nn.Linear` weights, except those in `skip`
    (matched as in `quantize_model`), and every other parameter. Chapter 14."""
    linears, linear_weights = [], set()
    for name, module in model.named_modules():
        skipped = any(name == s or name.endswith("." + s) for s in skip)
        if isinstance(module, nn.Linear) and not skipped:
            linears.append(tuple(module.weight.shape))
            linear_weights.add(id(module.weight))
    others = [p.numel() for p in model.parameters() if id(p) not in linear_weights]
    return ModelShapes(linears, others)


def llama_shapes(hidden_size: int, intermediate_size: int, num_layers: int, vocab_size: int,
                 num_kv_heads: int | None = None, num_heads: int | None = None) -> ModelShapes:
    """`ModelShapes` of a LLaMA model: per layer q, k, v, o, gate, up, down projections and two RMSNorms;
    token embedding, final norm and an untied output head. Chapter 14 uses LLaMA 7B
    (4096, 11008, 32, 32000) and 65B (8192, 22016, 80, 32000). With grouped-query attention, k and v have
    `num_kv_heads * hidden_size / num_heads` outputs."""
    kv_size = hidden_size if num_kv_heads is None else num_kv_heads * (hidden_size // num_heads)
    h, f = hidden_size, intermediate_size
    layer = [(h, h), (kv_size, h), (kv_size, h), (h, h), (f, h), (f, h), (h, f)]  # q k v o gate up down
    others = [vocab_size * h] + [h, h] * num_layers + [h, vocab_size * h]  # embedding, norms, final norm, head
    return ModelShapes(layer * num_layers, others)


def quantized_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one tensor of `numel` values in 4 bits (chapter 12's format). Chapter 14.

    Half a byte per value (rounded up), plus one fp32 absmax per block, or with double quantization one uint8
    per block, an fp32 offset and one fp32 absmax per 256 blocks. The code tables are shared, not counted.
    """
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        return (numel + 1) // 2 + blocks + 4 + 4 * math.ceil(blocks / NESTED_BLOCKSIZE)
    return (numel + 1) // 2 + 4 * blocks


METHODS = ("full", "lora", "qlora")


def estimate_training_memory(shapes: ModelShapes, method: str, r: int = 8, *, weight_bytes: int = 4,
                             adapter_bytes: int = 4, optimizer_bytes: int = 8, step_bytes: int = 4,
                             blocksize: int = 64, double_quant: bool = True) -> TrainingMemory:
    """Weights, gradients and optimizer state of one training method, from shapes alone. Chapter 14.

    - "full": every parameter trains: weights and gradients at `weight_bytes` each, optimizer state at
      `optimizer_bytes` per parameter (Adam: fp32 m and v, 8) plus `step_bytes` per tensor (torch's Adam
      keeps a step count per parameter tensor);
    - "lora": all weights frozen at `weight_bytes`; each linear layer gets A (r, in) and B (out, r) at
      `adapter_bytes`, their gradients too, and optimizer state for them alone;
    - "qlora": as "lora", but the linear weights are 4-bit (`quantized_bytes`).

    The defaults (everything fp32) are what the chapter's tiny model measures; the QLoRA paper's setting is
    `weight_bytes=2, adapter_bytes=2` (bf16 base and adapters) with fp32 Adam state.
    """
    if method not in METHODS:
        raise ValueError(f"estimate_training_memory: method must be one of {METHODS}, got {method!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"estimate_training_memory: r must be an int >= 1, got {r!r}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"estimate_training_memory: blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}")
    if method == "full":
        n, tensors = shapes.num_parameters, len(shapes.linears) + len(shapes.others)
        return TrainingMemory(weights=n * weight_bytes, gradients=n * weight_bytes,
                              optimizer_state=n * optimizer_bytes + tensors * step_bytes)
    adapters = sum(r * (out + inp) for out, inp in shapes.linears)
    if method == "lora":
        base = shapes.num_parameters * weight_bytes
    else:
        base = (sum(quantized_bytes(out * inp, blocksize, double_quant) for out, inp in shapes.linears)
                + sum(shapes.others) * weight_bytes)
    return TrainingMemory(weights=base + adapters * adapter_bytes, gradients=adapters * adapter_bytes,
                          optimizer_state=adapters * optimizer_bytes + 2 * len(shapes.linears) * step_bytes)
