"""What every minillm model shares: input checks, the causal mask, gradient checkpointing, saving.

`GPT` (gpt.py) and `Llama` (llama.py) subclass `CausalLM`, the encoder `Bert` (bert.py) subclasses
`TransformerModel`; each of those files still reads top to bottom as one model, and this file holds only the
plumbing that would otherwise be written more than once. Chapter 06 teaches it.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm.attention import causal_mask, padding_mask, sliding_window_mask
from minillm.models import checkpoint as checkpoint_io


def check_config_int(config, *names: str, minimum: int = 1, optional: bool = False) -> None:
    """Raise a clear error unless each named config field is an int >= minimum (or None, if optional)."""
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{type(config).__name__}: {name} must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"{type(config).__name__}: {name} must be >= {minimum}, got {value}")


def check_config_probability(config, *names: str) -> None:
    """Raise a clear error unless each named config field (a dropout rate) is in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{type(config).__name__}: {name} is a dropout probability and must be in [0, 1), "
                             f"got {value!r}")


class TransformerModel(nn.Module):
    """A stack of transformer blocks over token embeddings, with a dataclass config.

    Subclasses set `model_type` (the name written into a saved config.json) and `config_class`, and expose
    their layers as `blocks`, an `nn.ModuleList` that `run_blocks` steps through. Set
    `model.gradient_checkpointing = True` to checkpoint every block during training.
    """

    model_type: str = ""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # Gradient checkpointing trades compute for memory: see run_blocks. Off by default, like in HF.
        self.gradient_checkpointing = False

    def run_blocks(self, x: torch.Tensor, *args) -> torch.Tensor:
        """x = block(x, *args) for every block, with each block checkpointed if `gradient_checkpointing` is on.

        A checkpointed block keeps only its input for the backward pass and recomputes everything inside it
        when the gradient reaches it, so activation memory grows with the number of blocks (one input each)
        instead of with everything each block computes. The recomputation replays the same random numbers
        (torch restores the RNG state), so even dropout gives identical gradients. `use_reentrant=False` is
        the variant torch recommends: it works with inputs that do not require grad and with
        `torch.autograd.grad`.
        """
        use_checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, *args, use_reentrant=False) if use_checkpoint else block(x, *args)
        return x

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, int]:
        """Validate the inputs of `forward` and return (B, T). An embedding lookup with a bad id fails deep
        inside torch with an index error; checking here names the problem."""
        name = type(self).__name__
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"{name}: input_ids must be an integer tensor (torch.long) of token ids, got {got}")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise ValueError(f"{name}: input_ids must have shape (B, T) with B, T >= 1, got {tuple(input_ids.shape)};"
                             " for a single sequence use input_ids[None]")
        lo, hi = input_ids.min().item(), input_ids.max().item()
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or attention_mask.shape != input_ids.shape):
            got = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                   else type(attention_mask).__name__)
            raise ValueError(f"{name}: attention_mask must be a (B, T) tensor of 0/1 like input_ids "
                             f"{tuple(input_ids.shape)}, got {got}")
        return input_ids.shape

    def num_parameters(self) -> int:
        """Number of parameters, each tied weight counted once (`parameters()` already deduplicates)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory) -> None:
        """Write config.json and model.safetensors into `directory` (see minillm.models.checkpoint)."""
        checkpoint_io.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory):
        """Load a model written by `save_pretrained`; the saved model_type must be this class's."""
        return checkpoint_io.load_pretrained(directory, expected=cls)


class CausalLM(TransformerModel):
    """A decoder-only language model: token ids (B, T) in, next-token logits (B, T, vocab_size) out."""

    @staticmethod
    def build_mask(T: int, attention_mask: torch.Tensor | None, sliding_window: int | None = None,
                   device=None) -> torch.Tensor:
        """The bool mask (True = may attend) every layer uses: causal (or a sliding window), and no pad keys.

        (T, T) without an attention_mask, (B, 1, T, T) with one. A pad *query* (left padding) sees no key at
        all; attention gives it the zero vector (chapter 05), and its logits are meaningless either way.
        """
        if sliding_window is None:
            mask = causal_mask(T, device=device)  # (T, T)
        else:
            mask = sliding_window_mask(T, T, sliding_window, device=device)  # (T, T)
        if attention_mask is not None:
            mask = mask & padding_mask(attention_mask)  # (B, 1, T, T)
        return mask
