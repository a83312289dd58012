"""minillm.peft.lora against PEFT 0.21.2's LoRA (chapter 09).

The reference runs here: `peft.get_peft_model` on tiny HF GPT-2 / Llama models whose minillm twins have the
same weights (eager attention, which minillm matches bit for bit). With the same seed both sides draw the
same A; B (zero at init) is filled with the same random values; then logits and every LoRA gradient must be
`torch.equal`, with and without rsLoRA and dropout. Dropout is exact too: only the LoRA dropout modules are
in train mode, both models call them in the same layer order, and the RNG is reseeded before each forward.
"""

import copy
import math

import pytest
import torch
from torch import nn

from minillm.peft import LoRALinear, add_lora, lora_state_dict, merge_lora, trainable_parameters
from minillm.quant.int8 import Int8Linear
from minillm.quant.linear4bit import Int4Linear

pytestmark = [pytest.mark.filterwarnings("ignore:.*fan_in_fan_out"),  # PEFT's note that GPT-2 uses Conv1D
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # transformers, called by PEFT
              pytest.mark.filterwarnings("ignore:.*script_method")]  # torch.jit, imported by PEFT


def assert_equal(ours, theirs, what, fix):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, \
        f"{what}: got {ours.dtype} {tuple(ours.shape)}, PEFT has {theirs.dtype} {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        pytest.fail(f"{what}: {int((ours != theirs).sum())} of {ours.numel()} values differ from PEFT's, max|Δ| = "
                    f"{(ours - theirs).abs().max().item():.3g}; {fix}")


def ids_for(model, seed=0, B=2, T=9):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- bitwise against PEFT
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_and_gradients_equal_peft(arch, use_rslora, dropout, twins, peft_lora, lora_params, fill_lora_B,
                                         only_lora_dropout_active):
    hf, ours, targets = twins(arch)
    torch.manual_seed(0)
    add_lora(ours, r=4, alpha=8, target_modules=targets, dropout=dropout, use_rslora=use_rslora)
    torch.manual_seed(0)
    theirs = peft_lora(hf, targets, r=4, alpha=8, dropout=dropout, use_rslora=use_rslora)

    ours_params, peft_params = lora_params(ours), lora_params(theirs)
    assert set(ours_params) == set(peft_params), \
        f"LoRA wraps other layers than PEFT: {sorted(set(ours_params) ^ set(peft_params))}"
    for name, p in ours_params.items():
        assert_equal(p.detach(), peft_params[name].detach(), f"initial {name}",
                     "with one seed PEFT's A is the third draw per layer (nn.Linear A, nn.Linear B, then "
                     "kaiming_uniform_ on A) and B is zero; wrap layers in named_modules order")
    fill_lora_B(ours), fill_lora_B(theirs)

    only_lora_dropout_active(ours), only_lora_dropout_active(theirs)
    ids = ids_for(ours)
    torch.manual_seed(1)
    logits = ours(ids)
    torch.manual_seed(1)
    expected = theirs(input_ids=ids).logits
    assert_equal(logits, expected, "logits", "compute base(x) + lora_B(lora_A(dropout(x))) * scaling in PEFT's "
                 f"order; scaling = alpha / {'sqrt(r)' if use_rslora else 'r'}")
    if dropout > 0:
        assert not torch.equal(logits, ours.eval()(ids)), "LoRA dropout had no effect in train mode"

    logits.logsumexp(-1).mean().backward()
    expected.logsumexp(-1).mean().backward()
    for name, p in ours_params.items():
        assert_equal(p.grad, peft_params[name].grad, f"gradient of {name}",
                     "the backward follows the forward's ops: check their order and dtypes")


def test_starts_as_the_base_model(twins):
    """B = 0 at init, so a freshly wrapped model computes exactly what the pretrained one did."""
    _, ours, targets = twins("llama")
    ids = ids_for(ours)
    before = ours(ids)
    add_lora(ours, r=4, alpha=8, target_modules=targets)
    assert torch.equal(ours(ids), before), "the wrapped model must equal the base model while B is zero"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_to_hf_with_adapters_says_what_to_do(arch, twins):
    """Converting a model whose layers are wrapped must name the cause, not list mismatched weight names."""
    _, ours, targets = twins(arch)
    add_lora(ours, r=2, alpha=4, target_modules=targets)
    with pytest.raises(ValueError, match="carries LoRA adapters.*merge_lora"):
        ours.to_hf()
    merged = merge_lora(ours)  # the advice in the message works: the merged model converts, logits unchanged
    ids = ids_for(merged)
    assert torch.equal(merged.to_hf()(ids).logits, merged(ids)), "to_hf after merge_lora must keep the logits"


def test_freezes_everything_else_and_counts(twins):
    _, ours, _ = twins("gpt2")
    add_lora(ours, r=4, alpha=8, target_modules=["c_attn"])
    C, L = ours.config.hidden_size, ours.config.num_layers
    expected = L * 4 * (C + 3 * C)  # per layer A (r, C) and B (3C, r)
    assert trainable_parameters(ours) == expected, \
        f"trainable_parameters = {trainable_parameters(ours)}, expected L * r * (in + out) = {expected}"
    trainable = sorted(name for name, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_state_dict(ours)), f"only lora_A / lora_B may train, got {trainable}"
    assert sorted(lora_state_dict(ours)) == sorted(f"transformer.h.{i}.attn.c_attn.lora_{m}.weight"
                                                    for i in range(L) for m in "AB")


def test_init_bounds():
    """A ~ U(±1/√in) (kaiming-uniform with a = √5, as nn.Linear and PEFT), B = 0."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 300), r=64, alpha=16)
    A, bound = layer.lora_A.weight, 1 / math.sqrt(400)
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound, \
        f"max|A| = {A.abs().max():.4f}, expected just under 1/sqrt(in) = {bound:.4f}"
    assert torch.count_nonzero(layer.lora_B.weight) == 0, "B must start at zero"
    assert layer.scaling == 16 / 64 and LoRALinear(nn.Linear(4, 4), 64, 16, use_rslora=True).scaling == 16 / 8


# ----------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merge_equals_peft_merge_and_unload(arch, twins, peft_lora, fill_lora_B):
    hf, ours, targets = twins(arch)
    add_lora(ours, r=4, alpha=8, target_modules=targets)
    theirs = peft_lora(hf, targets, r=4, alpha=8)
    fill_lora_B(ours), fill_lora_B(theirs)
    with torch.no_grad():  # the same A too (the seeds above differ on purpose)
        for layer_name, p in lora_state_dict(ours).items():
            if ".lora_A." in layer_name:
                p.copy_(theirs.get_submodule("base_model.model." + layer_name.replace(".weight", ".default")).weight)
    ids = ids_for(ours)
    with torch.no_grad():
        unmerged = ours(ids)
        exact = copy.deepcopy(ours).double()(ids)  # the unmerged model in float64
        merge_lora(ours)
        merged_hf = theirs.merge_and_unload()
        merged = ours(ids)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules()), "merge_lora must put the plain layers back"
    for name, module in ours.named_modules():
        if name.rpartition(".")[2] in targets:
            ref = merged_hf.get_submodule(name).weight
            weight = module.weight.T if arch == "gpt2" else module.weight  # HF's Conv1D stores (in, out)
            assert_equal(weight.detach(), ref.detach(), f"merged {name}.weight",
                         "add (B @ A) * scaling to the weight in place, in its own layout")
    # Merging regroups the sums, x @ (W + ΔW) instead of x @ W + ((x @ A^T) @ B^T) * s, and rounds W + ΔW to
    # fp32 once: the logits move by rounding, not more. Against the unmerged model run in float64, the merged
    # model must be about as accurate as the unmerged one in fp32. The mean error is the stable measure (the
    # two measured within 5% of each other); a single worst logit can land either side of its rounding.
    err_merged, err_unmerged = (merged - exact).abs().mean(), (unmerged - exact).abs().mean()
    assert err_merged <= 2 * err_unmerged, (f"merged logits are {err_merged:.2g} from float64 on average, unmerged "
                                            f"{err_unmerged:.2g}: merging changed more than rounding")


def test_unmerge_restores_the_weight():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 40), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    original, x = layer.base.weight.detach().clone(), torch.randn(5, 48)
    y = layer(x)
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y, atol=1e-5), "merged forward must equal the adapter forward"
    layer.unmerge()
    # w + d - d is w up to one rounding of the sum: half an ulp of |w + d|.
    ulp = torch.finfo(torch.float32).eps * (original.abs() + layer.delta_weight().abs())
    assert not layer.merged and ((layer.base.weight - original).abs() <= ulp).all(), "unmerge must subtract the update"
    assert torch.allclose(layer(x), y, atol=1e-5)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_hf_conv1d_base_matches_peft(twins, peft_lora, fill_lora_B):
    """add_lora also works on an HF GPT-2 itself, whose c_attn is a Conv1D (weight (in, out))."""
    hf, _, targets = twins("gpt2")
    ours = copy.deepcopy(hf)
    torch.manual_seed(0)
    add_lora(ours, r=4, alpha=8, target_modules=targets)
    torch.manual_seed(0)
    theirs = peft_lora(hf, targets, r=4, alpha=8)
    fill_lora_B(ours), fill_lora_B(theirs)
    ids = ids_for(hf)
    with torch.no_grad():
        assert_equal(ours(ids).logits, theirs(input_ids=ids).logits, "logits with Conv1D bases", "same op order")
        merge_lora(ours)
        merged_hf = theirs.merge_and_unload()
    ref = merged_hf.transformer.h[0].attn.c_attn.weight
    assert_equal(ours.transformer.h[0].attn.c_attn.weight, ref, "merged Conv1D weight",
                 "a Conv1D stores (in, out): add (B @ A).T * scaling (PEFT's fan_in_fan_out)")


# ---------------------------------------------------------------------------------------------- dtypes
class OneLayer(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.proj = nn.Linear(24, 16, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_half_precision_base_keeps_fp32_adapters_as_peft(dtype, peft_lora, fill_lora_B):
    """PEFT upcasts fp16/bf16 adapters to fp32 (and rounds the fresh A through the base dtype first)."""
    torch.manual_seed(0)
    base = OneLayer(dtype)
    ref_base = copy.deepcopy(base)
    torch.manual_seed(1)
    ours = add_lora(base, r=4, alpha=8, target_modules=["proj"])
    torch.manual_seed(1)
    theirs = peft_lora(ref_base, ["proj"], r=4, alpha=8)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ours.proj.lora_A.weight.dtype == expected_dtype, \
        f"adapters next to a {dtype} base must be {expected_dtype}, got {ours.proj.lora_A.weight.dtype}"
    assert_equal(ours.proj.lora_A.weight, theirs.base_model.model.proj.lora_A.default.weight, "initial A",
                 "build A in fp32, round it to the base dtype, then upcast, as PEFT does")
    fill_lora_B(ours), fill_lora_B(theirs)
    x = torch.randn(3, 24, dtype=dtype)
    assert_equal(ours(x), theirs(x), f"output of a {dtype} layer", "cast x to the adapter dtype, add, cast back")


@pytest.mark.parametrize("quantize", [
    lambda linear: Int4Linear.from_linear(linear, "nf4", blocksize=32, compute_dtype=torch.bfloat16),
    lambda linear: Int8Linear.from_linear(linear)], ids=["int4-bf16", "int8"])
def test_quantized_base(quantize):
    """QLoRA's layout: fp32 adapters beside a quantized base; the update is rounded to the output dtype and
    then added (PEFT's bitsandbytes layers); merging is refused."""
    torch.manual_seed(0)
    layer = LoRALinear(quantize(nn.Linear(64, 32)), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_A.weight.requires_grad
    x = torch.randn(3, 64)
    update = layer.lora_B(layer.lora_A(x)) * layer.scaling  # (3, 32) fp32
    base = layer.base(x)
    assert torch.equal(layer(x), base + update.to(base.dtype)), "quantized base: round the update, then add"
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match="quantized"):
        merge_lora(model)
    assert isinstance(model[0], LoRALinear), "a refused merge must leave the model unchanged"


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r .*must be an int >= 1"), (dict(r=-2), "r .*>= 1"), (dict(r=2.0), "r .*int"),
    (dict(alpha=0), "alpha must be a number > 0"), (dict(alpha=-1.0), "alpha"),
    (dict(dropout=1.0), r"dropout .*\[0, 1\)"), (dict(dropout=-0.1), "dropout")])
def test_bad_hyperparameters(kwargs, match, twins):
    _, ours, _ = twins("gpt2")
    args = dict(r=4, alpha=8, target_modules=["c_attn"]) | kwargs
    with pytest.raises(ValueError, match=match):
        add_lora(ours, **args)
    assert trainable_parameters(ours) == ours.num_parameters(), "a refused add_lora must leave the model unchanged"
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **{k: v for k, v in args.items() if k != "target_modules"})


def test_unknown_target_lists_the_available_ones(twins):
    _, ours, _ = twins("gpt2")
    with pytest.raises(ValueError, match=r"named \['q_proj'\].*\['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        add_lora(ours, r=4, alpha=8, target_modules=["c_attn", "q_proj"])
    assert not lora_state_dict(ours), "nothing may be wrapped when one target is unknown"
    with pytest.raises(ValueError, match="transformer.h.0.attn is a CausalSelfAttention, not a linear layer"):
        add_lora(ours, r=4, alpha=8, target_modules=["attn"])
    with pytest.raises(TypeError, match=r"list of module names such as \['c_attn'\]"):
        add_lora(ours, r=4, alpha=8, target_modules="c_attn")


def test_wrapping_twice_and_non_linear_bases(twins):
    _, ours, _ = twins("gpt2")
    add_lora(ours, r=4, alpha=8, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(ours, r=4, alpha=8, target_modules=["c_attn"])
    with pytest.raises(TypeError, match="cannot wrap a LayerNorm"):
        LoRALinear(nn.LayerNorm(8), r=2, alpha=4)
    with pytest.raises(TypeError, match="already is a LoRALinear"):
        LoRALinear(ours.transformer.h[0].attn.c_attn, r=2, alpha=4)
