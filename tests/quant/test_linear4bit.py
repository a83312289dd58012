"""minillm.quant.linear4bit: `Int4Linear` against bitsandbytes' `Linear4bit`, and `quantize_model`.

`Linear4bit` on CPU has two paths. Train mode (the default of every new nn.Module) dequantizes the weight to
the compute dtype and calls `F.linear`: `Int4Linear` equals it bit for bit. Eval mode without gradients, on
CPUs with AVX512-BF16, repacks the weight and runs a bf16 kernel: there we allow the bf16 rounding,
`max|Δ| <= 1e-2 * max|y|` (measured: under 5e-3); elsewhere eval mode is the train path, and equal.

Layers here have in_features a multiple of the blocksize: bitsandbytes' AVX512 dequantize is wrong otherwise
(see test_nf4.py), and `Linear4bit` uses it.
"""

import copy
import itertools

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_F
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from torch import nn

from minillm.models import GPT, GPTConfig, Llama, LlamaConfig
from minillm.quant.int8 import Int8Linear
from minillm.quant.linear4bit import Int4Linear, quantize_model
from minillm.quant.nf4 import quantize_4bit

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtype_id(value):
    return str(value).removeprefix("torch.")


def bnb_linear4bit(linear, quant_type, blocksize, compress_statistics, compute_dtype):
    """bitsandbytes' Linear4bit holding the same weight and bias; moving it to the CPU quantizes it."""
    ref = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                            quant_type=quant_type)
    ref.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                   blocksize=blocksize, compress_statistics=compress_statistics)
    if linear.bias is not None:
        ref.bias = nn.Parameter(linear.bias.detach().clone())
    return ref.to("cpu")


def assert_equal(ours, theirs, what):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, \
        f"{what}: got {ours.dtype} {tuple(ours.shape)}, expected {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        pytest.fail(f"{what}: {int((ours != theirs).sum())} of {ours.numel()} differ, max|Δ| = "
                    f"{(ours.float() - theirs.float()).abs().max().item():.3g}")


# ----------------------------------------------------------------------- Int4Linear vs Linear4bit
@pytest.mark.parametrize("quant_type,blocksize,compress_statistics,compute_dtype,x_dtype", list(itertools.product(
    ["nf4", "fp4"], [32, 256], [False, True], DTYPES, DTYPES)), ids=dtype_id)
def test_train_mode_equals_bitsandbytes(quant_type, blocksize, compress_statistics, compute_dtype, x_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 48)
    ours = Int4Linear.from_linear(linear, quant_type, blocksize, compress_statistics, compute_dtype)
    ref = bnb_linear4bit(linear, quant_type, blocksize, compress_statistics, compute_dtype).train()
    x = torch.randn(2, 5, 256).to(x_dtype)  # (B, T, in_features)
    with torch.no_grad():
        assert_equal(ours(x), ref(x), f"Int4Linear vs Linear4bit (train mode), {quant_type} blocksize {blocksize} "
                                      f"double-quant {compress_statistics}, compute {compute_dtype}, x {x_dtype}")


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_gradients_equal_bitsandbytes(compute_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    ours = Int4Linear.from_linear(linear, "nf4", 64, True, compute_dtype)
    ref = bnb_linear4bit(linear, "nf4", 64, True, compute_dtype).train()
    x = torch.randn(4, 128)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    grad = torch.randn_like(y_ref)
    y_ours.backward(grad)
    y_ref.backward(grad)
    assert_equal(y_ours, y_ref, "output with gradients on")
    assert_equal(x_ours.grad, x_ref.grad, "gradient with respect to x")
    # Linear4bit casts its own bias to the compute dtype in place on the first forward; ours stays fp32 and
    # gets the same gradient values, in fp32.
    assert_equal(ours.bias.grad.to(ref.bias.dtype), ref.bias.grad, "gradient with respect to the bias")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_eval_mode_close_to_bitsandbytes(quant_type):
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)  # bitsandbytes' bf16 CPU kernel needs out_features divisible by its tile
    ours = Int4Linear.from_linear(linear, quant_type, 64, True).eval()
    ref = bnb_linear4bit(linear, quant_type, 64, True, torch.float32).eval()
    x = torch.randn(3, 256)
    with torch.no_grad():
        y_ours, y_ref = ours(x), ref(x)
    if not bnb_F.has_avx512bf16():  # eval mode is the train path here
        assert_equal(y_ours, y_ref, "Int4Linear vs Linear4bit (eval mode, no AVX512-BF16)")
        return
    error = (y_ours - y_ref).abs().max() / y_ref.abs().max()
    assert error <= 1e-2, (f"Int4Linear vs Linear4bit in eval mode: relative max error {error:.2e}; bitsandbytes "
                           "computes in bf16 here, which explains up to ~5e-3, not more")


def test_int4linear_matches_dequantized_weight():
    # The layer is F.linear with the dequantized weight: a check that needs no bitsandbytes.
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    layer = Int4Linear.from_linear(linear, blocksize=32)
    packed, state = quantize_4bit(linear.weight.detach(), 32, "nf4")
    weight = _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), state.absmax, state.code, 32, state.shape,
                                                  torch.float32)
    x = torch.randn(7, 64)
    assert_equal(layer(x), torch.nn.functional.linear(x, weight), "Int4Linear(x) vs F.linear(x, dequantized W)")
    assert layer.in_features == 64 and layer.out_features == 32 and layer.bias is None


def test_buffers_follow_the_module():
    linear = nn.Linear(64, 16)
    layer = Int4Linear.from_linear(linear, compress_statistics=True)
    names = set(layer.state_dict())
    assert names == {"weight_packed", "weight_absmax", "weight_offset", "weight_nested_absmax", "bias"}, \
        f"state_dict should hold the packed weight, every tensor of the QuantState and the bias, got {names}"
    packed, state = quantize_4bit(linear.weight.detach(), 64, "nf4", compress_statistics=True)
    rebuilt = layer.quant_state
    assert_equal(layer.weight_packed, packed, "packed weight")
    for field in ("absmax", "code", "offset", "nested_absmax", "nested_code"):
        assert_equal(getattr(rebuilt, field), getattr(state, field), f"quant_state.{field}")
    assert (rebuilt.shape, rebuilt.dtype, rebuilt.blocksize, rebuilt.quant_type, rebuilt.nested_blocksize) == \
        (state.shape, state.dtype, state.blocksize, state.quant_type, state.nested_blocksize)


# --------------------------------------------------------------------------------- quantize_model
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, max_seq_len=32, hidden_size=64, num_layers=2, num_heads=4)).eval()


def tiny_llama():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=96, max_seq_len=32, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=128)).eval()


def linear_names(model, cls=nn.Linear):
    return {name for name, module in model.named_modules() if isinstance(module, cls)}


@pytest.mark.parametrize("make_model", [tiny_gpt, tiny_llama])
def test_quantize_model_nf4_equals_bitsandbytes_weights(make_model):
    # Reference: the same model with every weight (except lm_head) replaced by bitsandbytes' NF4 + double
    # quantization round trip, in fp32.
    model = make_model()
    reference = copy.deepcopy(model)
    quantized_names = linear_names(model) - {"lm_head"}
    for name in quantized_names:
        linear = reference.get_submodule(name)
        packed, state = bnb_F.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4",
                                            compress_statistics=True)
        absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        linear.weight.data = _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, state.code, 64,
                                                                  state.shape, torch.float32)

    quantized = quantize_model(model, "nf4", compress_statistics=True)
    assert quantized is model, "quantize_model replaces layers in place and returns the model"
    assert linear_names(model, Int4Linear) == quantized_names, "every nn.Linear but lm_head should be Int4Linear"
    assert linear_names(model) == {"lm_head"}, "lm_head is skipped by default"
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        assert_equal(model(ids), reference(ids), "logits of the NF4 model vs bitsandbytes-dequantized weights")


@pytest.mark.parametrize("method,cls", [("fp4", Int4Linear), ("int8", Int8Linear)])
def test_quantize_model_other_methods(method, cls):
    model = tiny_gpt()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        expected = model(ids)
        quantize_model(model, method)
        got = model(ids)
    assert linear_names(model, cls) == linear_names(tiny_gpt()) - {"lm_head"}, f"{method}: layers not swapped"
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < 0.2, f"{method}: logits moved by {error:.3f} of their range; quantization broke the model"


def test_quantize_model_skip_and_options():
    model = quantize_model(tiny_gpt(), "nf4", skip=("c_proj", "lm_head"), blocksize=32, compute_dtype=torch.bfloat16)
    left = linear_names(model)
    assert left == {"lm_head", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                    "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"}, \
        f"skip=('c_proj', 'lm_head') should skip every layer named c_proj, left {sorted(left)}"
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Int4Linear) and layer.blocksize == 32 and layer.compute_dtype == torch.bfloat16
    everything = quantize_model(tiny_gpt(), "nf4", skip=())
    assert linear_names(everything) == set(), "skip=() should quantize lm_head too"


def test_quantize_model_of_a_single_linear():
    layer = quantize_model(nn.Linear(64, 8), "nf4")
    assert isinstance(layer, Int4Linear), "a bare nn.Linear comes back quantized"


# ------------------------------------------------------------------------------------- bad inputs
def test_three_dimensional_weight_is_rejected():
    packed, state = quantize_4bit(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match=r"Int4Linear: the weight must be 2-D \(out_features, in_features\), "
                                         r"got shape \(2, 3, 64\)"):
        Int4Linear(packed, state)


def test_int4linear_bad_inputs():
    with pytest.raises(TypeError, match=r"expected an nn.Linear, got Conv1d"):
        Int4Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match=r"blocksize must be a power of two from 32 to 4096"):
        Int4Linear.from_linear(nn.Linear(64, 8), blocksize=100)
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\)"):
        Int4Linear.from_linear(nn.Linear(64, 8), quant_type="int4")
    with pytest.raises(ValueError, match=r"compute_dtype must be one of"):
        Int4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.float64)
    layer = Int4Linear.from_linear(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"input of shape \(3, 32\) does not fit weight \(8, 64\)"):
        layer(torch.randn(3, 32))
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"needs a bias of shape \(8,\), got \(4,\)"):
        Int4Linear(packed, state, bias=torch.zeros(4))


def test_quantize_model_bad_inputs():
    with pytest.raises(ValueError, match=r"method must be one of \('nf4', 'fp4', 'int8'\), got 'int4'"):
        quantize_model(tiny_gpt(), "int4")
    with pytest.raises(TypeError, match=r"skip must be a tuple of module names"):
        quantize_model(tiny_gpt(), "nf4", skip="lm_head")
