"""Checks for chapter 09's exercises. PEFT judges every answer: each check builds PEFT's own LoRA layer (through
`peft.get_peft_model`), copies the same weights in, and compares what PEFT computes with what the learner's
function returns."""

import contextlib
import warnings

import torch
from torch import nn

from minillm.exercises import Mismatch, check, expect_equal, expect_tensor


@contextlib.contextmanager
def _quiet():
    """PEFT and transformers warn about things that do not matter here (fan_in_fan_out, CPU kernels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _One(nn.Module):
    """A model holding one layer named `proj`, so that PEFT has something to target."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _peft_layer(base: nn.Module, r: int, alpha: float, use_rslora: bool = False, fan_in_fan_out: bool = False):
    """(PEFT model, its LoRA layer) around `base`, with PEFT's own init (B = 0) left untouched."""
    with _quiet():
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=use_rslora,
                            fan_in_fan_out=fan_in_fan_out)
        model = get_peft_model(_One(base), config)
    return model, model.base_model.model.proj


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _expect_tensor(got, expected: torch.Tensor, what: str) -> None:
    got = expect_tensor(got, expected, what, check_dtype=False)
    expect_equal(got, expected.detach(), what=what, atol=1e-5, rtol=1e-5)


def check_lora_forward(lora_forward) -> None:
    """Exercise 9.1: `lora_forward(x, weight, bias, A, B, scaling)` is a LoRA layer's output for x (..., in),
    a base weight (out, in) and bias (out,), A (r, in) and B (out, r)."""
    def case(batch_shape, in_features, out_features, r, alpha, seed):
        def run():
            base = nn.Linear(in_features, out_features)
            with torch.no_grad():
                base.weight.copy_(_randn(out_features, in_features, seed=seed))
                base.bias.copy_(_randn(out_features, seed=seed + 1))
            model, layer = _peft_layer(base, r, alpha)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with torch.no_grad():
                B.copy_(_randn(out_features, r, seed=seed + 2))  # PEFT starts B at 0; a real update tests more
            x = _randn(*batch_shape, in_features, seed=seed + 3)
            with torch.no_grad():
                expected = model(x)
                got = lora_forward(x.clone(), base.weight.clone(), base.bias.clone(), A.clone(), B.clone(),
                                   layer.scaling["default"])
            _expect_tensor(got, expected, f"lora_forward on x of shape {tuple(x.shape)}, r={r}, alpha={alpha}")
        return run

    cases = [case((3,), 4, 5, 1, 1, 0), case((2, 7), 8, 6, 2, 4, 10), case((2, 3, 5), 16, 48, 4, 8, 20)]
    check("Exercise 9.1 (the LoRA forward)", cases,
          hint="x @ weight.T + bias plus (x @ A.T) @ B.T times scaling; A maps in -> r, B maps r -> out")


def check_lora_scaling(lora_scaling) -> None:
    """Exercise 9.2: `lora_scaling(alpha, r, use_rslora)` is the factor the update B @ A is multiplied by."""
    def case(alpha, r, use_rslora):
        def run():
            _, layer = _peft_layer(nn.Linear(8, 8), r, alpha, use_rslora=use_rslora)
            expected = layer.scaling["default"]
            got = lora_scaling(alpha, r, use_rslora)
            if isinstance(got, bool) or not isinstance(got, (int, float)):
                raise Mismatch(f"lora_scaling({alpha}, {r}, {use_rslora}): expected a number, got {type(got).__name__}")
            expect_equal(float(got), expected, what=f"lora_scaling(alpha={alpha}, r={r}, use_rslora={use_rslora})",
                         atol=1e-12, rtol=1e-9)
        return run

    cases = [case(16, 8, False), case(16, 8, True), case(1, 1, True), case(32, 64, True), case(7, 3, False),
             case(8, 2, True)]
    check("Exercise 9.2 (the scale, with and without rsLoRA)", cases,
          hint="alpha / r normally; rsLoRA (Kalajdzievski, 2023) divides by the square root of r instead")


def check_merge_weight(merge_weight) -> None:
    """Exercise 9.3: `merge_weight(weight, A, B, scaling, fan_in_fan_out)` returns the base weight with the
    update folded in, in the base's own layout: (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D."""
    def case(in_features, out_features, r, alpha, fan_in_fan_out, seed):
        def run():
            with _quiet():
                from transformers.pytorch_utils import Conv1D
            base = Conv1D(out_features, in_features) if fan_in_fan_out else nn.Linear(in_features, out_features)
            with torch.no_grad():
                base.weight.copy_(_randn(*base.weight.shape, seed=seed))
            model, layer = _peft_layer(base, r, alpha, fan_in_fan_out=fan_in_fan_out)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with torch.no_grad():
                B.copy_(_randn(out_features, r, seed=seed + 1))
            weight, scaling = base.weight.detach().clone(), layer.scaling["default"]
            A, B = A.detach().clone(), B.detach().clone()
            with _quiet():
                expected = model.merge_and_unload().proj.weight
            got = merge_weight(weight, A, B, scaling, fan_in_fan_out)
            kind = "Conv1D weight (in, out)" if fan_in_fan_out else "Linear weight (out, in)"
            _expect_tensor(got, expected, f"merge_weight for a {kind} of {in_features} -> {out_features}, r={r}")
        return run

    cases = [case(4, 6, 2, 4, False, 0), case(8, 24, 3, 6, True, 10), case(5, 5, 1, 1, True, 20),
             case(16, 3, 4, 8, False, 30)]
    check("Exercise 9.3 (merge the adapter into the weight)", cases,
          hint="B @ A has shape (out, in); times scaling; a Conv1D stores its weight transposed, (in, out)")


def check_count_lora_parameters(count_lora_parameters) -> None:
    """Exercise 9.4: `count_lora_parameters(model, r, target_modules)` is how many numbers LoRA trains in a minillm
    GPT when every linear layer whose name ends with one of `target_modules` gets rank-r adapters."""
    from minillm.models import GPT, GPTConfig

    def case(sizes, r, targets):
        def run():
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=64, max_seq_len=16, **sizes))
            with _quiet():
                from peft import LoraConfig, get_peft_model
                twin = get_peft_model(model.to_hf(), LoraConfig(r=r, lora_alpha=r, target_modules=targets,
                                                                fan_in_fan_out=True))
            expected = twin.get_nb_trainable_parameters()[0]
            got = count_lora_parameters(model, r, targets)
            if isinstance(got, bool) or not isinstance(got, int):
                raise Mismatch(f"count_lora_parameters(..., r={r}, {targets}): expected an int, "
                               f"got {type(got).__name__}")
            expect_equal(got, expected, what=f"count_lora_parameters(GPT {sizes}, r={r}, {targets})", atol=0, rtol=0)
        return run

    cases = [case(dict(hidden_size=16, num_layers=1, num_heads=2), 2, ["c_attn"]),
             case(dict(hidden_size=24, num_layers=3, num_heads=3, intermediate_size=40), 4, ["c_attn", "c_fc"]),
             case(dict(hidden_size=16, num_layers=2, num_heads=4), 3, ["c_proj"])]
    check("Exercise 9.4 (count the trainable parameters)", cases,
          hint="each wrapped nn.Linear(in, out) adds r * (in + out); a name like 'c_proj' matches the attention's "
               "and the MLP's layer")
