"""Shared set-up for the PEFT tests (chapters 09-10): tiny HF models, their minillm twins, PEFT's LoRA on them.

The references are HF models built from configs (tests/models/hf_reference.py, weights std 0.2, eager
attention, which minillm matches bit for bit) and PEFT 0.21.2 applied to them. A conftest cannot be imported
by name (tests/quant has one too), so the helpers reach the tests as fixtures.
"""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from hf_reference import gpt2, llama  # noqa: E402

from minillm.models import GPT, Llama  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # PEFT imports it; its CPU-kernel notice is noise

# name -> (HF builder, minillm class, the attention layers the issue asks LoRA to target)
ARCHS = {
    "gpt2": (lambda seed: gpt2(seed=seed, vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4),
             GPT, ["c_attn"]),
    "llama": (lambda seed: llama(seed=seed, vocab_size=64, max_position_embeddings=32, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2),
              Llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


@pytest.fixture
def twins():
    """twins(arch, seed=0) -> (hf_model, minillm_model, targets): the same random weights, eval mode."""
    def make(arch: str, seed: int = 0):
        build, cls, targets = ARCHS[arch]
        hf = build(seed)
        return hf, cls.from_hf(hf).eval(), targets
    return make


@pytest.fixture
def peft_lora():
    """peft_lora(hf_model, targets, r, alpha, dropout=0.0, use_rslora=False): PEFT's `get_peft_model` (in place)."""
    from peft import LoraConfig, get_peft_model

    def wrap(hf, targets, r, alpha, dropout=0.0, use_rslora=False):
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                            use_rslora=use_rslora, task_type="CAUSAL_LM" if hasattr(hf, "config") else None)
        return get_peft_model(hf, config)
    return wrap


def _lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # PEFT's names carry "base_model.model." and the adapter name ".default"; without them they are ours.
    return {name.removeprefix("base_model.model.").replace(".default", ""): p
            for name, p in model.named_parameters() if ".lora_" in name}


@pytest.fixture
def lora_params():
    """lora_params(model) -> {"<layer>.lora_A.weight": parameter, ...} with the same keys for PEFT and minillm."""
    return _lora_params


@pytest.fixture
def fill_lora_B():
    """fill_lora_B(model, seed=0): every lora_B <- N(0, 0.3²), drawn in key order, so two models with the same
    layers get the same values. B starts at zero, and a zero B would hide every mistake in B, A or scaling."""
    @torch.no_grad()
    def fill(model, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        for name, p in sorted(_lora_params(model).items()):
            if ".lora_B." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return model
    return fill


@pytest.fixture
def only_lora_dropout_active():
    """only_lora_dropout_active(model): eval mode except the LoRA dropout modules, so that dropout draws
    random numbers only inside LoRA, in the same order for PEFT and for minillm (reseed before each forward)."""
    def activate(model):
        model.eval()
        for name, module in model.named_modules():
            if name.endswith("lora_dropout"):
                module.train()
        return model
    return activate
