"""What every minillm model shares: input checks, the causal mask, gradient checkpointing, saving.

`GPT` (gpt.py) and `Llama` (llama.py) subclass `CausalLM`, the encoder `Bert` (bert.py) subclasses
`TransformerModel`; each of those files still reads top to bottom as one model, and this file holds only the
plumbing that would otherwise be written more than once. Chapter 06 teaches it.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm.attention import causal_mask, padding_mask, sliding_window_mask
from minillm.cache import KVCache
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

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     num_past: int = 0) -> tuple[int, int]:
        """Validate the inputs of `forward` and return (B, T). An embedding lookup with a bad id fails deep
        inside torch with an index error; checking here names the problem. After `num_past` cached positions
        (chapter 07) the attention_mask covers those too: (B, num_past + T), as in HF."""
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
        expected = (input_ids.size(0), num_past + input_ids.size(1))
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != expected):
            got = (tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor)
                   else type(attention_mask).__name__)
            cached = f" ({num_past} cached positions + the {input_ids.size(1)} new ones)" if num_past else ""
            raise ValueError(f"{name}: attention_mask must be a (B, T) tensor of 0/1 of shape {expected}"
                             f"{cached} for input_ids {tuple(input_ids.shape)}, got {got}")
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
    """A decoder-only language model: token ids (B, T) in, next-token logits (B, T, vocab_size) out.

    `model(input_ids, attention_mask=None, cache=None)`: with a `KVCache` (chapter 07, `make_cache`) the
    input continues the text the cache has seen, and its keys and values are added to the cache.
    """

    @staticmethod
    def build_mask(T: int, attention_mask: torch.Tensor | None, sliding_window: int | None = None,
                   device=None, num_kept: int = 0) -> torch.Tensor | None:
        """The bool mask (True = may attend) every layer uses: causal (or a sliding window), and no pad keys.

        (T, T_k) without an attention_mask, (B, 1, T, T_k) with one, where T_k = num_kept + T: the keys are
        the `num_kept` ones a KV cache holds, then the T new ones, so the queries are the *last* T positions
        and the causal triangle sits bottom-right (chapter 05's `offset`; `is_causal=True` would put it
        top-left, which is wrong here). A pad *query* (left padding) sees no key at all; attention gives it
        the zero vector (chapter 05), and its logits are meaningless either way.

        Returns None (attend to everything) for a decoding step, T = 1 without padding: the newest position
        may see every key the cache kept (a window keeps only the last W - 1), and skipping the mask makes
        each step cheaper while giving the very same numbers.
        """
        if T == 1 and attention_mask is None:
            return None
        T_k = num_kept + T
        if sliding_window is None:
            mask = causal_mask(T, T_k, device=device)  # (T, T_k)
        else:
            mask = sliding_window_mask(T, T_k, sliding_window, device=device)  # (T, T_k)
        if attention_mask is not None:
            mask = mask & padding_mask(attention_mask[:, attention_mask.size(1) - T_k:])  # (B, 1, T, T_k)
        return mask

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty `KVCache` shaped for this model (its layers, kv heads, head dim, window, dtype, device).

        `max_len` (default: the config's max_seq_len, which it may not exceed) is the longest text it holds.
        """
        config = self.config
        max_len = config.max_seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= config.max_seq_len:
            raise ValueError(f"{type(self).__name__}.make_cache: max_len must be an int in [1, max_seq_len="
                             f"{config.max_seq_len}], got {max_len!r}; the model's context length is the limit")
        weight = self.lm_head.weight
        # GPT-2 has no grouped-query attention (num_kv_heads) and no window: fall back to num_heads / None.
        return KVCache(config.num_layers, batch_size, getattr(config, "num_kv_heads", config.num_heads),
                       config.head_dim, max_len, sliding_window=getattr(config, "sliding_window", None),
                       dtype=weight.dtype, device=weight.device)

    def check_cache(self, cache: KVCache | None) -> int:
        """Validate `cache` for `forward` and return how many positions it has seen (0 without one)."""
        if cache is None:
            return 0
        if not isinstance(cache, KVCache):
            raise TypeError(f"{type(self).__name__}: cache must be a minillm KVCache (model.make_cache(B)), "
                            f"got {type(cache).__name__}")
        if cache.num_layers != self.config.num_layers:
            raise ValueError(f"{type(self).__name__}: the cache has {cache.num_layers} layers but the model has "
                             f"{self.config.num_layers}; make it with model.make_cache(B)")
        if self.gradient_checkpointing and torch.is_grad_enabled():
            raise ValueError(f"{type(self).__name__}: a KV cache cannot be used with gradient checkpointing: the "
                             "recomputation would append each block's keys twice; generate under torch.no_grad()")
        return cache.length
