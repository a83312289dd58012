"""Save and load minillm models as a folder: config.json (the dataclass config) + model.safetensors (weights).

Chapter 06 teaches this. Why safetensors and not `torch.save`: `torch.save` pickles, and unpickling a file can
run any code its author put in it; a safetensors file is a JSON header plus raw tensor bytes, so loading it
only ever reads numbers. HF's `save_pretrained` writes the same kind of pair (with its own config keys).

Tied weights (GPT's `lm_head.weight` is the token embedding) are one tensor under two names; safetensors
refuses to store shared memory twice, so only the first name is stored (the embedding, as in HF's files)
and loading fills the other in through the tie the model builds itself.
"""

import dataclasses
import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from minillm.files import read_json_object, write_files_atomically

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model, directory) -> Path:
    """Write `directory/config.json` ({"model_type": ..., **config fields}) and `directory/model.safetensors`.

    The folder is created if needed; existing files of the same names are replaced, atomically: a save
    that fails halfway (a full disk) leaves the old pair loadable (minillm.files). Returns the folder.
    """
    if not dataclasses.is_dataclass(getattr(model, "config", None)) or not getattr(model, "model_type", ""):
        raise TypeError(f"save_pretrained needs a minillm model (GPT, Llama) with a dataclass config, "
                        f"got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": model.model_type, **dataclasses.asdict(model.config)}
    state, _ = _split_tied(model)
    weights = safetensors.torch.save({name: tensor.contiguous() for name, tensor in state.items()})  # file bytes
    write_files_atomically({directory / WEIGHTS_FILE: weights,
                            directory / CONFIG_FILE: json.dumps(config, indent=2) + "\n"})  # config last
    return directory


def load_pretrained(directory, expected):
    """Build the model a folder written by `save_pretrained` describes and load its weights.

    `expected` is the model class to build, or a list of classes to choose from by the saved model_type.
    The model comes back in eval mode, as HF's `from_pretrained` does. Nothing is allocated before the
    weights file's header (names and shapes) is checked against the model the config describes, so a damaged
    config (vocab_size=10**12) is reported, not attempted.
    """
    directory = Path(directory)
    classes = expected if isinstance(expected, (list, tuple)) else [expected]
    by_type = {cls.model_type: cls for cls in classes}
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"from_pretrained: {path} not found; a saved model folder holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by save_pretrained)")
    fields = read_json_object(config_path, "from_pretrained", "the config.json that save_pretrained writes")
    model_type = fields.pop("model_type", None)
    if model_type not in by_type:
        raise ValueError(f"from_pretrained: {config_path} has model_type {model_type!r}; "
                         f"this loader builds {sorted(by_type)}")
    cls = by_type[model_type]
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"from_pretrained: {config_path} has key {unknown[0]!r}, which "
                         f"{cls.config_class.__name__} does not have; its fields are {sorted(known)}")
    config = cls.config_class(**fields)
    stored = _stored_shapes(weights_path)
    with torch.device("meta"):  # shapes without memory: a model as big as the config says costs nothing here
        skeleton = cls(config)
    _check_weights_fit(skeleton, stored, weights_path)
    model = cls(config)
    model.load_state_dict(load_file(str(weights_path)), strict=False)  # the check above: every name fits
    return model.eval()


def _stored_shapes(weights_path: Path) -> dict[str, tuple]:
    """Name -> shape of each tensor in a safetensors file, read from its header alone (no weights loaded)."""
    try:
        with safe_open(str(weights_path), framework="pt") as file:
            return {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
    except SafetensorError as err:  # cut off, or another format (a pickle renamed): the header does not parse
        raise ValueError(f"from_pretrained: {weights_path} is damaged or not a safetensors file ({err}); "
                         "save the model again with save_pretrained") from None


def _check_weights_fit(model, stored: dict[str, tuple], weights_path: Path) -> None:
    """ValueError unless the file holds every weight of `model` (tied second names aside) in its shape."""
    state, tied = _split_tied(model)
    missing, unexpected = sorted(set(state) - set(stored)), sorted(set(stored) - set(state) - tied)
    if missing or unexpected:
        raise ValueError(f"from_pretrained: the weights in {weights_path} do not fit the model its config.json "
                         f"describes: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != stored[name]:
            raise ValueError(f"from_pretrained: the weights in {weights_path} do not fit the model its config.json "
                             f"describes: {name} has shape {stored[name]} in the file but {tuple(tensor.shape)} "
                             "in the model")


def _split_tied(model) -> tuple[dict, set[str]]:
    """The state dict without repeated tensors, and the names left out: a tied weight's second name is the
    same Parameter as its first (compared by identity, which also works on the meta device)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in tied}
    return state, tied
