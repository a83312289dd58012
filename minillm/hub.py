"""Real checkpoints from the Hugging Face Hub, through the same code as the course's tiny models.

    python -m minillm download gpt2                      # once, while online (~550 MB)
    model, tokenizer = load_hf("gpt2")                   # then offline, from the local Hugging Face cache
    model, tokenizer = load_hf("path/to/a/folder")       # or any folder that save_pretrained wrote

Chapters 06, 07, 09, 12 and 14 have an optional section "On a real model" that runs when a checkpoint is on
the machine (`real_model()`) and prints how to get one when it is not. Loading goes through transformers'
`from_pretrained` and chapter 06's `from_hf`, so the logits are HF's; the tokenizer is chapter 04's
`BPETokenizer` reading the checkpoint's own tokenizer.json. Nothing here touches the network except `download`.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.tokenizer import BPETokenizer


@dataclass(frozen=True)
class KnownCheckpoint:
    name: str           # the Hub repository id
    what: str           # one line for people
    download_mb: int    # what `download` fetches (the safetensors weights dominate)


# The real models the course's code path is written for (any GPT-2 / Llama / Mistral checkpoint with a
# byte-level BPE tokenizer.json also loads).
KNOWN = {
    "gpt2": KnownCheckpoint("gpt2", "GPT-2 124M (OpenAI, 2019), byte-level BPE with 50,257 tokens", 550),
    "HuggingFaceTB/SmolLM2-135M": KnownCheckpoint(
        "HuggingFaceTB/SmolLM2-135M", "SmolLM2 135M (Hugging Face, 2024), Llama architecture with GQA", 270),
}
SUPPORTED_TYPES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]


class CheckpointNotFound(FileNotFoundError):
    """The checkpoint is neither a local folder nor in the local Hugging Face cache."""


def how_to_get(name: str) -> str:
    """The one line a learner needs when `name` is not on the machine."""
    size = f" (about {KNOWN[name].download_mb} MB)" if name in KNOWN else ""
    return f"run `python -m minillm download {name}` once while online{size}"


def locate(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the checkpoint: `name_or_path` itself if it is a folder, else its snapshot in the
    Hugging Face cache (`cache_dir`, or HF_HUB_CACHE / HF_HOME as huggingface_hub reads them). Never downloads."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointNotFound(f"{path} is a folder but holds no config.json; expected a checkpoint folder "
                                     "written by save_pretrained (config.json, model.safetensors, tokenizer.json)")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        raise CheckpointNotFound(f"{name_or_path} is not on this machine (no such folder, and not in the local "
                                 f"Hugging Face cache); {how_to_get(str(name_or_path))}") from None


def load_hf(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
            cache_dir: str | os.PathLike | None = None):
    """A minillm GPT or Llama (eval mode) with a Hugging Face checkpoint's weights, and its tokenizer.

    Offline: the checkpoint must be a local folder or already in the Hugging Face cache (`download` puts it
    there). `dtype` None keeps the checkpoint's float32; torch.bfloat16 halves the memory. Peak memory is about
    twice the weights: transformers loads the checkpoint, `from_hf` copies it into the minillm model, and the
    transformers copy is dropped.
    """
    folder = locate(name_or_path, cache_dir)
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        supported = ", ".join(f"{t} ({cls})" for t, cls in SUPPORTED_TYPES.items())
        raise ValueError(f"{folder / 'config.json'}: model_type {model_type!r} is not supported; minillm loads "
                         f"{supported}")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; minillm reads byte-level BPE tokenizers from "
                                "the tokenizer.json that HF tokenizers writes")
    try:
        tokenizer = BPETokenizer.load(tokenizer_file)
    except ValueError as err:
        raise ValueError(f"minillm cannot read this checkpoint's tokenizer: {err}. It reads byte-level BPE "
                         "tokenizers (GPT-2's kind: a ByteLevel pre-tokenizer, alone or after Digits, and no "
                         "normalizer)") from None
    return _convert(folder, model_type, dtype), tokenizer


def _convert(folder: Path, model_type: str, dtype: torch.dtype | None):
    """transformers' from_pretrained (eager attention: the one our models match), then chapter 06's from_hf."""
    import transformers
    from minillm.models.hf import from_hf

    hf_class = getattr(transformers, SUPPORTED_TYPES[model_type])
    transformers.utils.logging.disable_progress_bar()  # its stderr bar would look like an error in a notebook
    try:
        hf_model = hf_class.from_pretrained(folder, dtype=dtype or torch.float32, attn_implementation="eager")
    finally:
        transformers.utils.logging.enable_progress_bar()
    model = from_hf(hf_model.eval())
    del hf_model
    return model


def real_model(name: str = "gpt2", dtype: torch.dtype | None = None):
    """`load_hf(name)` if the checkpoint is on this machine, else None after one line saying how to get it.

    The chapters' optional "On a real model" sections start with this, so they run where the learner has the
    checkpoint and print the same single line everywhere else (which is what nbval sees in CI).
    """
    try:
        return load_hf(name, dtype=dtype)
    except CheckpointNotFound:
        what = KNOWN[name].what if name in KNOWN else name
        print(f"{what} is not on this machine, so this section is skipped: {how_to_get(name)}.")
        return None


def download(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch a checkpoint's config, weights and tokenizer into the Hugging Face cache (progress bars from
    huggingface_hub); return its folder. The only function in minillm that uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(name, cache_dir=cache_dir, allow_patterns=FILES))
    except RepositoryNotFoundError:
        raise ValueError(f"the Hugging Face Hub has no model {name!r}; known to work: {', '.join(KNOWN)}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ConnectionError(f"could not download {name}: the Hugging Face Hub cannot be reached from this machine "
                              f"({type(err).__name__}). Connect to the internet (or unset HF_HUB_OFFLINE) and run "
                              f"`python -m minillm download {name}` again") from None
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{name} has no model.safetensors (older checkpoints ship only pickled .bin weights, "
                         "which minillm does not load: pickle can run code)")
    return folder


def real_text() -> str:
    """Real English prose that ships with every CPython: its licence (the Zen of Python where a distribution
    dropped the file). The real-model sections measure perplexity and fine-tune on it; about 2,000 words."""
    licence = Path(os.__file__).parent / "LICENSE.txt"
    if licence.is_file():
        return licence.read_text(encoding="utf-8")
    import codecs
    import this
    return codecs.decode(this.s, "rot13")


def _read_json(path: Path) -> dict:
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a UTF-8 JSON file ({err})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(fields).__name__}")
    return fields
