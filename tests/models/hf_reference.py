"""Tiny HF Transformers reference models for the tests in tests/models (no hub: built from configs).

Each call builds a fresh config object: HF models built from one config share it, and switching one to
eager attention would switch the others too. Weights are re-drawn with a spread large enough (std 0.2)
that the logits reach several units, so a wrong layout or a wrong eps shows up far above rounding.
"""

import logging
import warnings

import torch
import transformers

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("transformers").setLevel(logging.ERROR)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Redraw every parameter: norm scales around 1, biases and matrices around 0. Returns `model`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm_scale = p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else std * noise)
    return model


def gpt2(attn_implementation: str = "eager", seed: int = 0, **sizes) -> transformers.GPT2LMHeadModel:
    """A randomized GPT2LMHeadModel in eval mode. `sizes` are GPT2Config keywords."""
    config = transformers.GPT2Config(bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation,
                                     **sizes)
    torch.manual_seed(seed)
    return randomize(transformers.GPT2LMHeadModel(config), seed).eval()


def llama(attn_implementation: str = "eager", seed: int = 0, **sizes):
    """A randomized LlamaForCausalLM, or MistralForCausalLM when `sizes` has sliding_window, in eval mode."""
    mistral = "sliding_window" in sizes
    config_class = transformers.MistralConfig if mistral else transformers.LlamaConfig
    model_class = transformers.MistralForCausalLM if mistral else transformers.LlamaForCausalLM
    config = config_class(bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation, **sizes)
    torch.manual_seed(seed)
    return randomize(model_class(config), seed).eval()


def token_batch(vocab_size: int, B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, T) and an attention mask with left padding in row 1 and right padding in row 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        attention_mask[1, : T // 3] = 0
    if B > 2:
        attention_mask[2, T - T // 4:] = 0
    return ids, attention_mask
