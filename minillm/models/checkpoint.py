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

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_pretrained(model, directory) -> Path:
    """Write `directory/config.json` ({"model_type": ..., **config fields}) and `directory/model.safetensors`.

    The folder is created if needed; existing files of the same names are replaced. Returns the folder.
    """
    if not dataclasses.is_dataclass(getattr(model, "config", None)) or not getattr(model, "model_type", ""):
        raise TypeError(f"save_pretrained needs a minillm model (GPT, Llama) with a dataclass config, "
                        f"got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": model.model_type, **dataclasses.asdict(model.config)}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state, _ = _split_tied(model)
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(directory / WEIGHTS_FILE))
    return directory


def load_pretrained(directory, expected):
    """Build the model a folder written by `save_pretrained` describes and load its weights.

    `expected` is the model class to build, or a list of classes to choose from by the saved model_type.
    The model comes back in eval mode, as HF's `from_pretrained` does.
    """
    directory = Path(directory)
    classes = expected if isinstance(expected, (list, tuple)) else [expected]
    by_type = {cls.model_type: cls for cls in classes}
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"from_pretrained: {path} not found; a saved model folder holds "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by save_pretrained)")
    try:
        fields = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"from_pretrained: {config_path} is not valid JSON ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"from_pretrained: {config_path} must hold a JSON object, got {type(fields).__name__}")
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
    model = cls(cls.config_class(**fields))
    try:
        missing, unexpected = model.load_state_dict(load_file(str(weights_path)), strict=False)
    except (RuntimeError, SafetensorError) as err:
        raise ValueError(f"from_pretrained: the weights in {weights_path} do not fit the model its config.json "
                         f"describes: {err}") from None
    missing = set(missing) - _split_tied(model)[1]
    if missing or unexpected:
        raise ValueError(f"from_pretrained: the weights in {weights_path} do not fit the model its config.json "
                         f"describes: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return model.eval()


def _split_tied(model) -> tuple[dict, set[str]]:
    """The state dict without repeated tensors, and the names left out: a tied weight's second name points
    at the same memory as its first."""
    state, tied, seen = {}, set(), set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        else:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    return state, tied
