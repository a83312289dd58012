"""LoRA: a frozen linear layer plus a trainable low-rank update, y = base(x) + B(A(dropout(x))) * scaling.

Chapter 09 teaches this file. Fine-tuning changes a pretrained weight W (out, in) by some ΔW; LoRA (Hu et al.,
2021) bets that a useful ΔW has low rank and writes it as B @ A with A (r, in) and B (out, r), r much smaller
than in and out. Only A and B train: r * (in + out) numbers per layer instead of in * out, and the optimizer
keeps state for those alone. B starts at zero, so the wrapped model starts out computing exactly what the
pretrained one did; scaling = alpha / r keeps the update's size comparable across ranks (rsLoRA, Kalajdzievski
2023, uses alpha / √r, which stops large ranks from learning more slowly).

Every detail matches PEFT 0.21.2's `peft.tuners.lora.Linear` (and its bitsandbytes layers for quantized bases),
so that the same weights give bitwise the same logits and gradients: the initialisation and the random draws
it takes, the adapters' dtype, the order of the casts and additions in `forward`, and the arithmetic of
`merge` / `unmerge`.

    model = add_lora(model, r=8, alpha=16, target_modules=["c_attn"])   # in place; everything else frozen
    trainable_parameters(model)                                       # only the lora_A / lora_B weights
    merge_lora(model)                                                 # fold B @ A into the weights, unwrap
"""

import math
import sys
import warnings

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Is `module` HF's GPT-2 `Conv1D` (weight stored (in, out))? Without importing transformers: if it was
    never imported, no such module can exist."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a Conv1D or a quantized layer that exposes both."""
    if is_conv1d(base):
        return base.weight.shape  # Conv1D stores its weight (in, out)
    in_features, out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not (isinstance(in_features, int) and isinstance(out_features, int)):
        raise TypeError(f"LoRALinear: cannot wrap a {type(base).__name__}; the base must be an nn.Linear, HF's "
                        "Conv1D, or a module with int in_features and out_features (Int4Linear, Int8Linear)")
    return in_features, out_features


def _adapter_dtype(base: nn.Module) -> tuple[torch.dtype | None, torch.dtype]:
    """(base's float dtype or None, the adapters' dtype), as PEFT decides them.

    PEFT moves a new adapter to the base's dtype (its float `weight`'s, or bitsandbytes' `compute_dtype`),
    then `get_peft_model` upcasts fp16 / bf16 adapters back to fp32: A and B train in fp32 beside a
    half-precision base (their updates are tiny next to the weights, and would round away in 16 bits).
    """
    weight = getattr(base, "weight", None)
    base_dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    base_dtype = getattr(base, "compute_dtype", base_dtype)
    if base_dtype is None or not base_dtype.is_floating_point:
        return None, torch.get_default_dtype()
    return base_dtype, (torch.float32 if base_dtype.itemsize < 4 else base_dtype)


def check_lora_hyperparameters(where: str, r, alpha, dropout) -> None:
    """Raise a ValueError naming the bad value unless r is an int >= 1, alpha > 0 and dropout in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r (the rank of B @ A) must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}: alpha must be a number > 0 (scaling = alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: dropout is a probability and must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """A frozen `base` layer plus the trainable low-rank update B(A(dropout(x))) * scaling.

    Chapter 09 teaches this. `base` is an `nn.Linear`, HF's GPT-2 `Conv1D` (fan-in/fan-out: its weight is
    stored (in, out), which matters only for `merge`), or a quantized layer with `in_features` /
    `out_features` (chapter 14's QLoRA wraps `Int4Linear`). A is `nn.Linear(in, r)`, B `nn.Linear(r, out)`,
    neither with a bias, as in PEFT. A is drawn kaiming-uniform (U(±1/√in)) and B is zero: the product
    starts at zero but its gradient does not (∂L/∂B = grad_out ⋅ A x ≠ 0), and once B moves A gets gradient too.

    The adapters are fp32 next to a fp16/bf16 (or quantized) base and take the base's dtype otherwise; x is
    cast to their dtype for the update, as in PEFT. The sum is then rounded to the base's output dtype:
    after the addition for a float base (PEFT's `lora.Linear`), before it for a quantized one (PEFT's
    bitsandbytes layers). Both orders are PEFT's, and they differ only when the dtypes do.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("LoRALinear: the base already is a LoRALinear; merge it first (merge_lora) to stack "
                            "a second adapter on top")
        check_lora_hyperparameters("LoRALinear", r, alpha, dropout)
        self.in_features, self.out_features = in_out_features(base)
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, bool(use_rslora)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # PEFT skips the dropout module entirely at p = 0, so no random numbers are drawn.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PEFT builds both layers (each nn.Linear draws its own default init), then draws A once more and zeroes
        # B. Doing the same, in the same order, gives PEFT's A from the same seed.
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        # kaiming_uniform with a=√5: gain √(2/(1+5)), bound √3·gain/√in = 1/√in, so A ~ U(±1/√in).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        base_dtype, lora_dtype = _adapter_dtype(base)
        tensors = [*base.parameters(), *base.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        for layer in (self.lora_A, self.lora_B):
            if base_dtype is not None:  # PEFT rounds the fresh A to the base's dtype before upcasting it
                layer.to(base_dtype)
            layer.to(device, lora_dtype)
        self.merged = False

    @property
    def mergeable(self) -> bool:
        """Only a float weight can absorb B @ A; a quantized one would have to be re-quantized (and rounded)."""
        return isinstance(self.base, nn.Linear) or is_conv1d(self.base)

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight, so that code reading `layer.weight` (a dtype, a tied head) still works, as in PEFT."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out)
        if self.merged:  # B @ A is inside the base weight already
            return result
        result_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)  # a no-op when the dtypes agree
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling  # (..., r) -> (..., out)
        if self.mergeable:  # PEFT's lora.Linear: add in the promoted dtype, round once
            return (result + update).to(result_dtype)
        return result + update.to(result_dtype)  # PEFT's bitsandbytes layers: round the update, then add

    def delta_weight(self) -> torch.Tensor:
        """(B @ A) * scaling in the base weight's layout: (out, in), or (in, out) for a Conv1D (PEFT's
        `fan_in_fan_out`). On the CPU a fp16/bf16 adapter is multiplied in fp32, as PEFT does (CPUs have
        slow half-precision matmuls)."""
        A, B = self.lora_A.weight, self.lora_B.weight  # (r, in), (out, r)
        low_precision = A.itemsize < 4 and A.device.type == "cpu"
        if low_precision:
            A, B = A.float(), B.float()
        delta = B @ A  # (out, in)
        if is_conv1d(self.base):
            delta = delta.T  # (in, out)
        delta = delta * self.scaling
        return delta.to(self.lora_B.weight.dtype) if low_precision else delta

    def _check_mergeable(self, what: str) -> None:
        if not self.mergeable:
            raise ValueError(f"LoRALinear.{what}: the base is a {type(self.base).__name__}, whose weight is "
                             "quantized; B @ A can only be merged into an nn.Linear or Conv1D weight. Keep the "
                             "adapter separate, or dequantize the base into an nn.Linear first")

    @torch.no_grad()
    def merge(self) -> None:
        """Add (B @ A) * scaling into the base weight in place; `forward` then runs the base alone."""
        self._check_mergeable("merge")
        if self.merged:
            warnings.warn("LoRALinear.merge: already merged; nothing to do")
            return
        self.base.weight += self.delta_weight()  # in place: the weight keeps its memory layout
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again. Not exact: w + d - d rounds, so the weight can move in its last bits."""
        self._check_mergeable("unmerge")
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: not merged; nothing to do")
            return
        weight = self.base.weight
        weight -= self.delta_weight().to(weight.dtype)  # PEFT rounds the delta to the weight's dtype here
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, use_rslora={self.use_rslora}, merged={self.merged}")


# ----------------------------------------------------------------------------------------- the model
def _is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, HF's Conv1D, or a quantized layer that states its in_features and out_features."""
    if isinstance(module, LoRALinear):
        return False
    return is_conv1d(module) or all(isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features"))


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's full name is `target` or ends with "." + target."""
    return name == target or name.endswith("." + target)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module, for every layer LoRA can wrap (not those inside an existing LoRALinear)."""
    inside = [name + "." for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {name: m for name, m in model.named_modules()
            if _is_linear_like(m) and not any(name.startswith(prefix) for prefix in inside)}


def available_targets(model: nn.Module) -> list[str]:
    """The short names LoRA can target in `model` (the last part of each linear-like module's name)."""
    return sorted({name.rpartition(".")[2] for name in linear_layers(model)})


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Full name -> LoRALinear, for every LoRA layer in `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int, alpha: float, target_modules, dropout: float = 0.0,
             use_rslora: bool = False) -> nn.Module:
    """Wrap every layer named in `target_modules` in a `LoRALinear`, freeze all other parameters; in place.

    Chapter 09 teaches this. `target_modules` is a list of names matched as PEFT matches a list: a module is
    wrapped when its full name equals a target or ends with "." + target (["c_attn"] picks every block's
    `transformer.h.N.attn.c_attn`; ["q_proj", "v_proj"] two of Llama's projections). Each name must match at
    least one linear-like layer. Modules are wrapped in `named_modules` order, as PEFT does, so one seed
    gives PEFT's initial A matrices. Returns `model`.
    """
    check_lora_hyperparameters("add_lora", r, alpha, dropout)
    if (isinstance(target_modules, str) or not isinstance(target_modules, (list, tuple)) or not target_modules
            or not all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"add_lora: target_modules must be a non-empty list of module names such as ['c_attn'], "
                        f"got {target_modules!r}")
    wrapped = lora_layers(model)
    for target in target_modules:
        if any(matches_target(name, target) for name in wrapped):
            raise ValueError(f"add_lora: {target!r} already has a LoRA adapter; call merge_lora(model) first "
                             "to fold it in, or start from the model without adapters")
    candidates = linear_layers(model)
    chosen = [name for name in candidates if any(matches_target(name, t) for t in target_modules)]
    unknown = [t for t in target_modules if not any(matches_target(name, t) for name in candidates)]
    if unknown:
        not_linear = [f"{name} is a {type(m).__name__}" for name, m in model.named_modules()
                      if any(matches_target(name, t) for t in unknown)]
        hint = f" ({not_linear[0]}, not a linear layer)" if not_linear else ""
        raise ValueError(f"add_lora: no linear layer of this {type(model).__name__} is named {unknown}{hint}; "
                         f"the linear layers LoRA can target are {available_targets(model)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(candidates[name], r, alpha, dropout, use_rslora)
        setattr(model.get_submodule(parent_name), child, layer)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layer back; in place, returns `model`.

    Like PEFT's `merge_and_unload`: the result is the original architecture, with W + (B @ A) * scaling as
    weights, and runs at the original speed. Parameters stay frozen. Refused (before anything changes) when
    a base is quantized.
    """
    layers = lora_layers(model)
    for layer in layers.values():
        layer._check_mergeable("merge")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers the optimizer updates: parameters with requires_grad, each shared one counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' weights: {"<layer name>.lora_A.weight": (r, in), "<layer name>.lora_B.weight": (out, r)}.

    For minillm's GPT and Llama the layer names are HF's, so these are PEFT's saved keys without the
    "base_model.model." prefix (minillm.peft.adapters writes that format).
    """
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state
