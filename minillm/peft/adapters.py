"""LoRA adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Chapter 09 teaches this. An adapter is a few megabytes next to a model of gigabytes: the file holds A and B
for each wrapped layer and a config saying how to rebuild the wrappers (rank, alpha, which layers). Writing
PEFT 0.21.2's format makes the two interchangeable both ways:

    save_adapter(model, "ad")                                     # minillm GPT or Llama with add_lora
    PeftModel.from_pretrained(hf_twin, "ad")                      # hf_twin: the model's to_hf() before add_lora
    load_adapter(GPT.from_hf(hf), "ad_trained_with_peft")         # and back

PEFT saves each weight as "base_model.model.<module name>.lora_A.weight" (its in-memory ".default" adapter
name is dropped). minillm's GPT and Llama use HF's module names (minillm.models.hf), so the name of a layer
is the same on both sides and only that prefix is added or removed.
"""

import json
import re
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn

from minillm.files import read_json_object, write_files_atomically
from minillm.models import GPT, Bert
from minillm.peft.lora import (add_lora, available_targets, in_out_features, is_conv1d, linear_layers, lora_layers,
                               matches_target)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
# What load_adapter cannot do without: the layers to wrap, the rank and the scale alpha / r.
REQUIRED = ("target_modules", "r", "lora_alpha")
# Options of PEFT's LoraConfig that change what the adapter computes and that minillm does not implement.
# Each must be absent or off (None, False, {}, [] or "none") for load_adapter to accept a file.
UNSUPPORTED = ("use_dora", "lora_bias", "bias", "rank_pattern", "alpha_pattern", "modules_to_save",
               "layers_to_transform", "layer_replication", "target_parameters", "trainable_token_indices",
               "exclude_modules", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
               "velora_config", "monteclora_config", "kasa_config")


def _target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """The shortest target list that makes PEFT wrap exactly the wrapped layers: their last names
    (["c_attn"]) when those pick nothing else, the full names otherwise (only some blocks, say)."""
    short = sorted({name.rpartition(".")[2] for name in wrapped})
    linear = [*linear_layers(model), *wrapped]
    picked = {name for name in linear if any(matches_target(name, t) for t in short)}
    return short if picked == set(wrapped) else sorted(wrapped)


def save_adapter(model: nn.Module, directory) -> None:
    """Write `model`'s LoRA adapters to `directory` so that PEFT's `PeftModel.from_pretrained` can load them.

    All layers must share r, alpha, dropout and rsLoRA (PEFT would need a rank_pattern otherwise).
    `fan_in_fan_out` is set for a GPT, whose HF twin stores its linear weights as `Conv1D` (PEFT sets it
    itself, with a warning, when it meets one). Chapter 09 teaches this.
    """
    if isinstance(model, Bert):
        raise TypeError("save_adapter: minillm's Bert names its layers differently from HF's BertModel, so a "
                        "PEFT adapter file would not match it; save_adapter supports GPT, Llama and HF models")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: this {type(model).__name__} has no LoRA layers; call add_lora first")
    settings = {(layer.r, layer.alpha, getattr(layer.lora_dropout, "p", 0.0), layer.use_rslora)
                for layer in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"save_adapter: the LoRA layers differ in (r, alpha, dropout, use_rslora): "
                         f"{sorted(settings)}; PEFT's adapter_config.json holds one setting for all layers")
    (r, alpha, dropout, use_rslora), = settings
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "target_modules": _target_modules(model, list(layers)),
        "fan_in_fan_out": isinstance(model, GPT) or any(is_conv1d(layer.base) for layer in layers.values()),
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()  # (r, in)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()  # (out, r)
    # Both files at once, config last (minillm.files): a save that fails halfway leaves the old adapter whole.
    write_files_atomically({directory / WEIGHTS_NAME: safetensors.torch.save(tensors, metadata={"format": "pt"}),
                            directory / CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n"})


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and the weights (keys without PEFT's prefix) of an adapter directory, checked."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"load_adapter: {directory} has no {name}; an adapter directory holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME} (save_adapter or PEFT's save_pretrained)")
    config = read_json_object(directory / CONFIG_NAME, "load_adapter", "the adapter_config.json that PEFT or "
                              "save_adapter writes")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {directory} holds a {config.get('peft_type')!r} adapter; load_adapter "
                         "reads LoRA adapters only (prefix and prompt tuning live in minillm.peft.prefix / .prompt)")
    for key in UNSUPPORTED:
        if config.get(key) not in (None, False, {}, [], "none"):
            raise ValueError(f"load_adapter: {directory} sets {key}={config[key]!r}, a PEFT option minillm's LoRA "
                             "does not implement; only plain LoRA (with or without rsLoRA) can be loaded")
    absent = [key for key in REQUIRED if key not in config]
    if absent:
        raise ValueError(f"load_adapter: {directory / CONFIG_NAME} lacks {absent}; a LoRA adapter_config.json "
                         f"names {list(REQUIRED)} (PEFT's save_pretrained and save_adapter write them)")
    targets = config["target_modules"]
    if not isinstance(targets, str) and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"load_adapter: target_modules in {directory / CONFIG_NAME} must be a list of layer names "
                         f"or one regular expression (a string), got {targets!r}")
    weights = {}
    for key, tensor in load_file(directory / WEIGHTS_NAME).items():
        if not key.startswith(PREFIX):
            raise ValueError(f"load_adapter: weight {key!r} in {directory} does not start with {PREFIX!r}; "
                             "not an adapter saved by PEFT for a causal language model")
        weights[key.removeprefix(PREFIX)] = tensor
    return config, weights


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Add the LoRA adapter saved in `directory` to `model` (add_lora with the file's settings, then its
    weights); in place, returns `model`.

    Reads what `save_adapter` writes and what PEFT's `save_pretrained` writes for the model's HF twin.
    `model` must not have LoRA layers yet. Everything is checked before the model changes: the file's
    target layers must exist in `model`, and its weights must cover exactly those layers, with shapes
    (r, in_features) and (out_features, r); otherwise the ValueError names what differs (an adapter for
    another architecture, another size or another number of layers). Chapter 09 teaches this.

    A string `target_modules` is a regular expression run with `re.fullmatch`, as in PEFT; one with nested
    quantifiers such as "(a+)+$" can take exponential time on a long layer name. PEFT hangs on it the same
    way, so we do not guard against it: load adapters from sources you trust to be well-formed.
    """
    directory = Path(directory)
    if lora_layers(model):
        raise ValueError(f"load_adapter: this {type(model).__name__} already has LoRA layers; load into the model "
                         "without adapters (a fresh copy, or after merge_lora)")
    config, weights = _read(directory)
    targets, r = config["target_modules"], config["r"]
    candidates = linear_layers(model)
    if isinstance(targets, str):  # PEFT's other form: one regular expression that full names must match
        targets = [name for name in candidates if re.fullmatch(targets, name)] or [targets]
    missing = [t for t in targets if not any(matches_target(name, t) for name in candidates)]
    if missing:
        raise ValueError(f"load_adapter: the adapter in {directory} targets {sorted(missing)}, which this "
                         f"{type(model).__name__} does not have (its linear layers: {available_targets(model)}); "
                         "it was saved for a different architecture")
    chosen = [name for name in candidates if any(matches_target(name, t) for t in targets)]
    expected = {}
    for name in chosen:
        in_features, out_features = in_out_features(candidates[name])
        expected[f"{name}.lora_A.weight"] = (r, in_features)
        expected[f"{name}.lora_B.weight"] = (out_features, r)
    absent, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if absent or extra:
        raise ValueError(f"load_adapter: the weights in {directory} do not match this {type(model).__name__}'s "
                         f"layers: missing {absent[:4]}{' ...' if len(absent) > 4 else ''}, unexpected "
                         f"{extra[:4]}{' ...' if len(extra) > 4 else ''}; the adapter belongs to a model with "
                         "other layers (a different architecture or number of layers)")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"load_adapter: {key} in {directory} has shape {tuple(weights[key].shape)} but this "
                             f"model needs {shape} (r={r}); the adapter was trained on a model of another size")
    add_lora(model, r, config["lora_alpha"], targets, dropout=config.get("lora_dropout", 0.0),
             use_rslora=config.get("use_rslora", False))
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(weights[f"{name}.lora_A.weight"])
            layer.lora_B.weight.copy_(weights[f"{name}.lora_B.weight"])
    return model
