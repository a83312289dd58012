"""`Int4Linear`, a 4-bit drop-in for `nn.Linear`, and `quantize_model`, which swaps them into any model.

Chapter 12 teaches this module; chapter 14 trains LoRA adapters on top of `Int4Linear` and teaches its
backward pass (`Linear4bitFunction`), which keeps only the 4-bit bytes between forward and backward. The model
never knows: `quantize_model` walks any `nn.Module` and replaces its `nn.Linear` children in place, so minillm's
GPT and Llama, or any model built from `nn.Linear`, are quantized the same way (Hugging Face's GPT-2 uses its
own `Conv1D` layers, which are left alone).
"""

import torch
import torch.nn.functional as F
from torch import nn

from minillm.quant.blockwise import FLOAT_DTYPES, _check_float_tensor, create_dynamic_map
from minillm.quant.int8 import Int8Linear
from minillm.quant import nf4  # nf4.quantize_4bit is looked up at call time: chapter 12's exercise swaps it
from minillm.quant.nf4 import NESTED_BLOCKSIZE, QuantState, dequantize_4bit, get_4bit_code

QUANTIZE_METHODS = ("nf4", "fp4", "int8")


class Int4Linear(nn.Module):
    """A linear layer whose weight is stored in 4 bits (NF4 or FP4) and dequantized on every forward.

    Chapter 12 teaches this. Build it with `Int4Linear.from_linear(linear, quant_type="nf4")`. The forward
    is bitsandbytes' `Linear4bit` on CPU in train mode: x is cast to `compute_dtype`, the weight is
    dequantized straight to `compute_dtype` (one rounding, from fp32), `F.linear` runs with the bias in
    `compute_dtype`, and the result is cast back to x's dtype. Gradients flow to x and the bias; the 4-bit
    weight is frozen (chapter 14 adds trainable LoRA weights beside it). The backward dequantizes the weight
    again instead of keeping it (`Linear4bitFunction`), as bitsandbytes' `MatMul4Bit` does, with equal results.

    The packed weight and the tensors of its QuantState are buffers, so `.to(device)`, `state_dict()` and
    the model's byte count see them; `quant_state` puts the QuantState back together. Choose the precision
    with `compute_dtype`: `.to(dtype)` or `.half()` would also cast the fp32 absmax buffers.

    One difference from bitsandbytes: its AVX512 CPU dequantize (which `Linear4bit` calls) is wrong for
    some in_features that are not a multiple of the blocksize (see `dequantize_4bit`); `Int4Linear` is not.
    """

    def __init__(self, weight_packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(quant_state, QuantState):
            raise TypeError(f"Int4Linear: quant_state must be a QuantState from quantize_4bit, "
                            f"got {type(quant_state).__name__}")
        if len(quant_state.shape) != 2:
            raise ValueError(f"Int4Linear: the weight must be 2-D (out_features, in_features), got shape "
                             f"{tuple(quant_state.shape)}")
        if compute_dtype not in FLOAT_DTYPES:
            raise ValueError(f"Int4Linear: compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype}; 4-bit "
                             "codes cannot be multiplied as they are, every forward dequantizes them to this dtype")
        out_features, in_features = quant_state.shape
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"Int4Linear: a weight of shape {tuple(quant_state.shape)} needs a bias of shape "
                             f"({out_features},), got {tuple(bias.shape)}")
        self.register_buffer("weight_packed", weight_packed)  # ((out * in + 1) // 2, 1) uint8
        self.register_buffer("weight_absmax", quant_state.absmax)  # (num_blocks,) fp32, uint8 if nested
        self.register_buffer("weight_offset", quant_state.offset)  # () fp32 or None
        self.register_buffer("weight_nested_absmax", quant_state.nested_absmax)  # (ceil(num_blocks/256),) or None
        self.weight_shape = quant_state.shape
        self.weight_dtype = quant_state.dtype
        self.blocksize = quant_state.blocksize
        self.quant_type = quant_state.quant_type
        self.bias = None if bias is None else nn.Parameter(bias)
        self.compute_dtype = compute_dtype
        # Chapter 13: True sends the CPU through the Triton kernel too (in Triton's interpreter), to check it.
        self.use_kernel = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = False, compute_dtype: torch.dtype = torch.float32) -> "Int4Linear":
        """Quantize an `nn.Linear`'s weight with `quantize_4bit`; the bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int4Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        packed, state = nf4.quantize_4bit(linear.weight.detach(), blocksize, quant_type, compress_statistics)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, state, bias, compute_dtype)

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def quant_state(self) -> QuantState:
        nested = self.weight_nested_absmax is not None
        device = self.weight_packed.device
        return QuantState(
            absmax=self.weight_absmax, shape=self.weight_shape, dtype=self.weight_dtype, blocksize=self.blocksize,
            quant_type=self.quant_type, code=get_4bit_code(self.quant_type).to(device),
            offset=self.weight_offset, nested_absmax=self.weight_nested_absmax,
            nested_code=create_dynamic_map(signed=True).to(device) if nested else None,
            nested_blocksize=NESTED_BLOCKSIZE if nested else None)

    def dequantized_weight(self) -> torch.Tensor:
        """(out_features, in_features) weight in `compute_dtype`.

        On a GPU chapter 13's Triton kernel dequantizes (one pass over the packed bytes, in parallel; its tests
        check it equals these torch ops); on the CPU the torch ops of chapter 12 do, because the same kernel in
        Triton's interpreter is tens of times slower than them (chapter 14 measures it), unless `use_kernel`
        is set (chapter 13 sets it to run a whole model through the kernel).
        """
        if self.weight_packed.is_cuda or self.use_kernel:
            from minillm.quant import kernels  # imports triton: only when a GPU needs it
            return kernels.dequantize_4bit(self.weight_packed, self.quant_state, out_dtype=self.compute_dtype)
        return dequantize_4bit(self.weight_packed, self.quant_state, dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float_tensor("Int4Linear", x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int4Linear: input of shape {tuple(x.shape)} does not fit weight "
                             f"({self.out_features}, {self.in_features}); the last dimension must be "
                             f"{self.in_features}")
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = Linear4bitFunction.apply(x.to(self.compute_dtype), bias, self)  # (..., out_features)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.weight_nested_absmax is not None}, compute_dtype={self.compute_dtype}")


class Linear4bitFunction(torch.autograd.Function):
    """`F.linear(x, W, bias)` for an `Int4Linear`, with W dequantized in the forward and again in the backward.

    Chapter 14 teaches this. Written as plain `F.linear(x, layer.dequantized_weight(), bias)`, autograd would
    keep the dequantized W (out x in, in compute_dtype) alive from the forward to the backward of every layer:
    a full-precision copy of the whole model, exactly what storing it in 4 bits was meant to avoid. W is frozen,
    so the backward needs neither x nor W's gradient, only dL/dx = dL/dy @ W and dL/db = the sum of dL/dy
    over every leading dimension; dequantizing W once more costs a little time and no memory.
    bitsandbytes' `MatMul4Bit` does the same, with the same ops, so gradients are equal bit for bit.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: Int4Linear) -> torch.Tensor:
        ctx.layer = layer  # the module, not its tensors: nothing but the 4-bit bytes stays alive
        return F.linear(x, layer.dequantized_weight(), bias)  # (..., out_features)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, ctx.layer.dequantized_weight())  # (..., in_features)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out_features,)
        return grad_x, grad_bias, None


def quantize_model(model: nn.Module, method: str = "nf4", skip: tuple[str, ...] = ("lm_head",),
                   **options) -> nn.Module:
    """Replace every `nn.Linear` in `model` (in place) by a quantized one; returns the model.

    Chapter 12 teaches this. `method` is "nf4" or "fp4" (`Int4Linear.from_linear`; options: blocksize,
    compress_statistics, compute_dtype) or "int8" (chapter 11's `Int8Linear.from_linear`, LLM.int8();
    option: threshold). A layer is left alone when its name (as in `model.named_modules()`) or the name's
    tail after a dot is in `skip`: the default keeps `lm_head`, which is often tied to the embedding and
    sensitive to quantization, in full precision. If `model` is itself an `nn.Linear`, the quantized
    layer is returned instead.
    """
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize_model: method must be one of {QUANTIZE_METHODS}, got {method!r}")
    if isinstance(skip, str) or not all(isinstance(name, str) for name in skip):
        raise TypeError(f"quantize_model: skip must be a tuple of module names such as ('lm_head',), got {skip!r}")

    def convert(linear: nn.Linear) -> nn.Module:
        if method == "int8":
            return Int8Linear.from_linear(linear, **options)
        return Int4Linear.from_linear(linear, quant_type=method, **options)

    if isinstance(model, nn.Linear):
        return convert(model)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            skipped = any(name == s or name.endswith("." + s) for s in skip)
            if isinstance(child, nn.Linear) and not skipped:
                setattr(parent, child_name, convert(child))
    return model
