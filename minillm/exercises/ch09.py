"""Checks for chapter 09's exercises. PEFT judges every answer: each check builds PEFT's own LoRA layer (through
`peft.get_peft_model`), copies the same weights in, and compares what PEFT computes with what the learner's
function returns.

The build exercise (9.1, `LoRALinear.forward`) is compared bit for bit, on every CPU: the learner's forward and
PEFT's `lora.Linear` run the same torch operations on the same tensors in the same order (the base layer, then
A, B and the scale), and minillm's GPT runs the same kernels as its HF twin (chapter 06 keeps GPT-2's weight
layout for that). The practice checks use a small tolerance, since a correct answer may order its sums
differently.
"""

import contextlib
import copy
import os
import tempfile
import warnings

import torch
from torch import nn

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict


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


def _peft_layer(base: nn.Module, r: int, alpha: float, use_rslora: bool = False, fan_in_fan_out: bool = False,
                dropout: float = 0.0):
    """(PEFT model, its LoRA layer) around `base`, with PEFT's own init (B = 0) left untouched."""
    with _quiet():
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=use_rslora,
                            fan_in_fan_out=fan_in_fan_out, lora_dropout=dropout)
        model = get_peft_model(_One(base), config)
    return model, model.base_model.model.proj


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _expect_tensor(got, expected: torch.Tensor, what: str, exact: bool = False) -> None:
    got = expect_tensor(got, expected, what, check_dtype=exact)
    tolerance = 0 if exact else 1e-5
    expect_equal(got, expected.detach(), what=what, atol=tolerance, rtol=tolerance)


@exercise("9.1", "LoRALinear forward", kind="build", component="lora_forward",
          replaces="minillm.peft.lora:LoRALinear.forward", hides=("LoRALinear.forward",))
def check_lora_linear_forward(forward) -> None:
    """Exercise 9.1 (build): `forward(layer, x)`, the forward of a minillm `LoRALinear` `layer` (base, lora_dropout,
    lora_A, lora_B, scaling, merged) for x (..., in), judged bit for bit by PEFT's `lora.Linear` holding the same
    weights, unmerged and merged, with and without rsLoRA, with dropout in train mode (same seed, same draws)."""
    from minillm.peft import LoRALinear

    def case(batch_shape, in_features, out_features, r, alpha, seed, use_rslora=False, dropout=0.0, merged=False):
        def run():
            base = nn.Linear(in_features, out_features)
            with torch.no_grad():
                base.weight.copy_(_randn(out_features, in_features, seed=seed))
                base.bias.copy_(_randn(out_features, seed=seed + 1))
            ours = LoRALinear(copy.deepcopy(base), r, alpha, dropout=dropout, use_rslora=use_rslora)
            model, layer = _peft_layer(base, r, alpha, use_rslora=use_rslora, dropout=dropout)
            with torch.no_grad():
                layer.lora_B["default"].weight.copy_(_randn(out_features, r, seed=seed + 2))  # B = 0 tests little
                ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
                ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
            if merged:
                ours.merge()
                with _quiet():
                    layer.merge()
            ours.train(dropout > 0), model.train(dropout > 0)
            x = _randn(*batch_shape, in_features, seed=seed + 3)
            with torch.no_grad():
                torch.manual_seed(seed)  # the same dropout draws on both sides
                expected = model(x)
                torch.manual_seed(seed)
                got = forward(ours, x.clone())
            what = (f"forward on x of shape {tuple(x.shape)}, r={r}, alpha={alpha}" + (", rsLoRA" if use_rslora else "")
                    + (f", dropout {dropout} in train mode" if dropout else "") + (", merged" if merged else ""))
            _expect_tensor(got, expected, what, exact=True)
        return run

    cases = [case((3,), 4, 5, 1, 1, 0), case((2, 7), 8, 6, 2, 4, 10), case((2, 3, 5), 16, 48, 4, 8, 20),
             case((4, 6), 16, 12, 4, 8, 30, use_rslora=True), case((3, 5), 12, 10, 2, 8, 40, dropout=0.3),
             case((2, 5), 8, 8, 2, 4, 50, merged=True)]
    check("9.1", cases,
          hint="the frozen base's output plus the low-rank update, which goes through the dropout, A, B and the "
               "scale, in that order; a merged layer already holds the update in its base weight.",
          more="use the layer's own modules and attributes (self.base, self.lora_dropout, self.lora_A, self.lora_B, "
               "self.scaling, self.merged), so dropout draws and rounding are PEFT's; if only the rsLoRA case fails, "
               "look at where the scale comes from; if only the merged case fails, look at what is added twice.")


def _lora_and_peft_twins(r: int = 8, alpha: float = 16):
    """The shipped model with LoRA on every c_attn (B random: as if trained a little) and PEFT's twin holding
    the same A and B; with the ids of a task prompt."""
    from peft import LoraConfig, get_peft_model

    from minillm import finetune
    from minillm.peft import add_lora
    from minillm.peft.lora import lora_layers
    from minillm.pretrained import load_pretrained

    torch.manual_seed(0)
    ours, tokenizer = load_pretrained()
    hf_twin = ours.to_hf()
    add_lora(ours, r=r, alpha=alpha, target_modules=["c_attn"])
    with _quiet():
        theirs = get_peft_model(copy.deepcopy(hf_twin), LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn"],
                                                                   fan_in_fan_out=True))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.weight.normal_(0.0, 0.05)
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    ids = torch.tensor([tokenizer.encode(finetune.task_pairs("val")[0].prompt)])  # (1, T)
    return ours, theirs, hf_twin, ids


def end_to_end_lora() -> bool:
    """Chapter 09's PEFT comparison with `LoRALinear.forward` (the learner's inside `use(lora_forward=...)`):
    logits and every adapter gradient bit for bit equal to PEFT's, and the `save_adapter` file loaded by PEFT's
    `PeftModel.from_pretrained` giving the same logits."""
    from peft import PeftModel

    from minillm.peft import save_adapter
    from minillm.peft.lora import lora_layers

    claim = ("LoRA on the shipped model with your forward: logits and A/B gradients equal PEFT's, and the "
             "save_adapter file loads in PEFT with equal logits, bit for bit")
    ours, theirs, hf_twin, ids = _lora_and_peft_twins()
    try:
        logits = ours(ids)
    except NotImplementedError:
        raise  # the stub: use() prints "plug-in skipped"
    except Exception as error:
        return verdict(False, claim, f"your forward raised {type(error).__name__}: {error}")
    expected = theirs(ids).logits
    if not isinstance(logits, torch.Tensor) or logits.shape != expected.shape or not torch.equal(logits, expected):
        detail = ("logits differ" if isinstance(logits, torch.Tensor) and logits.shape == expected.shape
                  else f"your model returned {type(logits).__name__}")
        if detail == "logits differ":
            detail += f": max |difference| {(logits - expected).abs().max().item():.3g}"
        return verdict(False, claim, detail)
    targets = ids[0, 1:]
    nn.functional.cross_entropy(logits[0, :-1], targets).backward()
    nn.functional.cross_entropy(expected[0, :-1], targets).backward()
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for part in ("lora_A", "lora_B"):
            got, want = getattr(layer, part).weight.grad, getattr(peft_layer, part)["default"].weight.grad
            if got is None or not torch.equal(got, want):
                return verdict(False, claim, f"the gradient of {name}.{part} differs from PEFT's")
    with tempfile.TemporaryDirectory() as directory, _quiet():
        save_adapter(ours, directory)
        loaded = PeftModel.from_pretrained(copy.deepcopy(hf_twin), directory)
        same_file = torch.equal(loaded(ids).logits, ours(ids))
    return verdict(same_file, claim, "PEFT's logits from your save_adapter file differ")


@exercise("9.2", "the scale, with and without rsLoRA")
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
    check("9.2", cases,
          hint="plain LoRA divides alpha by the rank; rsLoRA (Kalajdzievski, 2023) divides by a gentler function "
               "of the rank.",
          more="section 5's table prints both scales for four ranks; rsLoRA's agrees with plain LoRA's at r = 1.")


@exercise("9.3", "merge the adapter into the weight")
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
    check("9.3", cases,
          hint="the update is the product of the two adapter matrices times the scale, added to the weight in "
               "the weight's own layout.",
          more="work out the shape of the product of B and A and compare it with the weight's shape; GPT-2's "
               "Conv1D stores its weight the other way round from nn.Linear.")


@exercise("9.4", "count the trainable parameters")
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
    check("9.4", cases,
          hint="count A and B of every wrapped layer; their sizes depend only on r and the layer's in and out "
               "features.",
          more="walk model.named_modules() and match names as add_lora does (the full name, or its end after a "
               "dot); one target name can match layers in both the attention and the MLP.")
