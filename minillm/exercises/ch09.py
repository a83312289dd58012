"""Checks for chapter 09's exercises. PEFT judges every answer: each check builds PEFT's own LoRA layer (through
`peft.get_peft_model`), copies the same weights in, and compares what PEFT computes with what the learner's
function returns.

The build exercise (9.1, `LoRALinear.forward`) is compared bit for bit, on every CPU: the learner's forward and
PEFT's `lora.Linear` run the same torch operations on the same tensors in the same order (the base layer, then
A, B and the scale), and minillm's GPT runs the same kernels as its HF twin (chapter 06 keeps GPT-2's weight
layout for that). The build exercise 9.2 (`LoRALinear.delta_weight`, which `merge` and `unmerge` call) is
judged by a rounding bound derived from the computation instead: a correct answer may form B @ A and the scale
in another order (B @ (A * scaling), A.T @ B.T for a Conv1D), and each such order rounds differently. The
practice checks use a small tolerance.
"""

import contextlib
import copy
import os
import tempfile
import types
import warnings

import torch
from torch import nn

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict

U32 = 2.0 ** -24  # unit roundoff of float32


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


def _lora_and_peft_twins(r: int = 8, alpha: float = 16, use_rslora: bool = False):
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
    add_lora(ours, r=r, alpha=alpha, target_modules=["c_attn"], use_rslora=use_rslora)
    with _quiet():
        theirs = get_peft_model(copy.deepcopy(hf_twin), LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn"],
                                                                   fan_in_fan_out=True, use_rslora=use_rslora))
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


def _gamma(n: int) -> float:
    """γ_n = n·u / (1 - n·u): the relative error bound of n float32 roundings in a row (Higham §3.1)."""
    return n * U32 / (1 - n * U32)


def _expect_within(got, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Raise `Mismatch` naming the first element where |got - expected| exceeds the elementwise `bound`."""
    got = expect_tensor(got, expected, what)
    excess = ~((got.double() - expected.detach().double()).abs() <= bound)  # NaN counts as a mismatch
    if excess.any():
        index = tuple(int(i) for i in excess.nonzero()[0])
        raise Mismatch(f"{what}: first mismatch at index {index}: expected {expected[index].item():.6g}, got "
                       f"{got[index].item():.6g} (rounding allows {bound[index].item():.2g})")


def merge_bounds(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise bounds, in the base weight's layout, on |ours - PEFT's| for a `LoRALinear` `layer` in float32:
    (the delta, the weight after merge, the weight after merge then unmerge), valid for ANY order of the
    float32 operations on either side (computed in float64).

    With P = scaling · |B| @ |A| (transposed for a Conv1D): each delta entry is a dot product of length r, then
    times the scale, so it is within γ_{r+1} P of exact; adding it to W rounds once more: γ_{r+2} (|W| + P);
    subtracting the delta again costs one more delta and one rounding: γ_{r+3} · 2(|W| + P). Two sides: doubled.
    """
    from minillm.peft.lora import is_conv1d

    A, B = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()  # (r, in), (out, r)
    product = layer.scaling * (B.abs() @ A.abs())  # (out, in)
    if is_conv1d(layer.base):  # a Conv1D keeps its weight (in, out)
        product = product.T
    size = layer.base.weight.detach().double().abs() + product
    r = A.shape[0]
    return 2 * _gamma(r + 1) * product, 2 * _gamma(r + 2) * size, 4 * _gamma(r + 3) * size


@exercise("9.2", "LoRALinear delta_weight, for merge and unmerge", kind="build", component="lora_delta_weight",
          replaces="minillm.peft.lora:LoRALinear.delta_weight", hides=("LoRALinear.delta_weight",))
def check_lora_delta_weight(delta_weight) -> None:
    """Exercise 9.2 (build): `delta_weight(layer)`, the update (B @ A) · scaling of a float32 minillm `LoRALinear`
    in its base weight's layout, which `merge` adds and `unmerge` subtracts. Judged against PEFT's `lora.Linear`
    holding the same weights: its `get_delta_weight`, then the base weight after its `merge()` and after its
    `unmerge()` (ours running the learner's delta), for nn.Linear and GPT-2's Conv1D (`fan_in_fan_out=True`), with
    and without rsLoRA, each within the rounding bound of `merge_bounds`."""
    from minillm.peft import LoRALinear

    def case(in_features, out_features, r, alpha, seed, conv1d=False, use_rslora=False):
        def run():
            with _quiet():
                from transformers.pytorch_utils import Conv1D
            torch.manual_seed(seed)  # PEFT draws A from the global generator: the same A on every run
            base = Conv1D(out_features, in_features) if conv1d else nn.Linear(in_features, out_features)
            with torch.no_grad():
                base.weight.copy_(_randn(*base.weight.shape, seed=seed))
            ours = LoRALinear(copy.deepcopy(base), r, alpha, use_rslora=use_rslora)
            _, layer = _peft_layer(base, r, alpha, use_rslora=use_rslora, fan_in_fan_out=conv1d)
            with torch.no_grad():
                layer.lora_B["default"].weight.copy_(_randn(out_features, r, seed=seed + 1))  # B = 0 tests little
                ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
                ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
            kind = "Conv1D (weight (in, out))" if conv1d else "Linear (weight (out, in))"
            what = f"a {kind} {in_features} -> {out_features}, r={r}, alpha={alpha}"
            what += ", rsLoRA" if use_rslora else ""
            delta_bound, merged_bound, unmerged_bound = merge_bounds(ours)
            with torch.no_grad():
                got = delta_weight(ours)
            _expect_within(got, layer.get_delta_weight("default"), delta_bound, f"delta_weight of {what}")
            ours.delta_weight = types.MethodType(delta_weight, ours)  # this layer's merge and unmerge call yours
            ours.merge()
            with _quiet():
                layer.merge()
            peft_weight = layer.get_base_layer().weight
            _expect_within(ours.base.weight, peft_weight, merged_bound, f"the weight after merge() of {what}")
            ours.unmerge()
            layer.unmerge()
            _expect_within(ours.base.weight, peft_weight, unmerged_bound,
                           f"the weight after merge() then unmerge() of {what}")
        return run

    cases = [case(4, 6, 2, 4, 0), case(8, 24, 3, 6, 10, conv1d=True), case(6, 6, 2, 8, 20, conv1d=True),
             case(16, 12, 4, 8, 30, use_rslora=True), case(12, 36, 4, 16, 40, conv1d=True, use_rslora=True)]
    check("9.2", cases,
          hint="the update is the product of the two adapter matrices times the scale, laid out like the base's "
               "own weight.",
          more="write down the shapes of A, B and their product, and compare with self.base.weight.shape: GPT-2's "
               "Conv1D stores its weight the other way round from nn.Linear; the scale is self.scaling.")


def end_to_end_merge() -> bool:
    """Chapter 09's merge comparison with `LoRALinear.delta_weight` (the learner's inside
    `use(lora_delta_weight=...)`): LoRA with rsLoRA on every c_attn of the shipped model (B random) and PEFT's twin,
    then `merge_lora` against PEFT's `merge_and_unload`. Judged per layer by rounding bounds: every merged weight
    against PEFT's (`merge_bounds`), and every merged layer's output against the adapter layer's output on the
    same hidden states of a prompt, |ŷ - y| <= 2 γ_{in+r+4} (|bias| + |x| @ (|W| + P)) (a dot product of length
    in after a merge that rounds as `merge_bounds` says, against base + update: in + r + 2 roundings)."""
    from minillm.peft import merge_lora
    from minillm.peft.lora import lora_layers

    claim = ("merge_lora with your delta_weight, on rsLoRA adapters on every c_attn: each merged weight equals "
             "PEFT's merge_and_unload, and each merged layer gives the adapter layer's output, within the rounding "
             "bound")
    ours, theirs, _, ids = _lora_and_peft_twins(use_rslora=True)
    layers = lora_layers(ours)
    seen = {}  # name -> (input, output) of each adapter layer before merging

    def record(name):
        return lambda module, args, output: seen.__setitem__(name, (args[0].detach(), output.detach()))

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    with torch.no_grad():
        ours(ids)
    for handle in handles:
        handle.remove()
    bounds = {}
    for name, layer in layers.items():
        x, _ = seen[name]
        weight, bias = layer.base.weight.detach().double(), layer.base.bias.detach().double()  # (out, in), (out,)
        product = layer.scaling * (layer.lora_B.weight.double().abs() @ layer.lora_A.weight.double().abs())
        size = bias.abs() + x.double().abs() @ (weight.abs() + product).T  # (B, T, out)
        bounds[name] = (merge_bounds(layer)[1], 2 * _gamma(layer.in_features + layer.r + 4) * size)
    try:
        merge_lora(ours)
    except NotImplementedError:
        raise  # the stub: use() prints "plug-in skipped"
    except Exception as error:
        return verdict(False, claim, f"merge_lora with your delta_weight raised {type(error).__name__}: {error}")
    with _quiet():
        peft_merged = theirs.merge_and_unload()
    for name, layer in layers.items():
        weight_bound, output_bound = bounds[name]
        expected = peft_merged.get_submodule(name).weight.detach().T  # Conv1D (in, out) -> (out, in)
        if not (layer.base.weight.double() - expected.double()).abs().le(weight_bound).all():
            return verdict(False, claim, f"the merged weight of {name} differs from PEFT's beyond the bound")
        x, y = seen[name]
        with torch.no_grad():
            merged_output = layer.base(x)
        if not (merged_output.double() - y.double()).abs().le(output_bound).all():
            return verdict(False, claim, f"the merged {name} gives another output than the adapter layer")
    return verdict(True, claim)


@exercise("9.3", "the scale, with and without rsLoRA")
def check_lora_scaling(lora_scaling) -> None:
    """Exercise 9.3: `lora_scaling(alpha, r, use_rslora)` is the factor the update B @ A is multiplied by."""
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
    check("9.3", cases,
          hint="plain LoRA divides alpha by the rank; rsLoRA (Kalajdzievski, 2023) divides by a gentler function "
               "of the rank.",
          more="section 5's table prints both scales for four ranks; rsLoRA's agrees with plain LoRA's at r = 1.")


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
