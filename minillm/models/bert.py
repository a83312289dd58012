"""BERT: the encoder. The same attention and MLP as GPT-2, but every position sees every other, and post-LN.

Chapter 06 closes with this file. Given the same weights, `Bert` reproduces HF Transformers' `BertModel` (eager
attention) bit for bit; `Bert.from_hf` / `to_hf` convert (minillm.models.hf, which also lists how HF's longer
parameter names map onto ours).

Three differences from gpt.py, one idea each: the mask hides only padding (no causal triangle), so the
output at a position depends on the whole sentence; each block normalises *after* adding its branch, as the
original transformer did (post-LN); and there is no output layer over the vocabulary: the result is one vector
per position (plus, through `pool`, one per sequence) for a task head to use. Shapes in comments: B batch,
T positions, C hidden size.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minillm.attention import MultiHeadAttention, padding_mask
from minillm.models.base import TransformerModel, check_config_int, check_config_probability


@dataclass
class BertConfig:
    """Sizes of a BERT encoder. The defaults are BERT-base (110M parameters)."""

    vocab_size: int = 30522
    max_seq_len: int = 512
    type_vocab_size: int = 2          # segment ids: sentence A = 0, sentence B = 1
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.0              # on embeddings, attention weights and both branches
    layer_norm_eps: float = 1e-12
    pooler: bool = True               # the tanh layer over position 0 that `pool` applies

    def __post_init__(self):
        check_config_int(self, "vocab_size", "max_seq_len", "type_vocab_size", "hidden_size", "num_layers",
                         "num_heads", "intermediate_size")
        check_config_probability(self, "dropout")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"BertConfig: hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads}")


class BertLayer(nn.Module):
    """A post-LN block: x = norm(x + attn(x)), then x = norm(x + mlp(x)), with the exact (erf) GELU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = MultiHeadAttention(config.hidden_size, config.num_heads, bias=True, dropout=config.dropout)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, mask)))  # (B, T, C)
        x = self.mlp_norm(x + self.dropout(self.fc_out(F.gelu(self.fc_in(x)))))  # (B, T, C)
        return x


class Bert(TransformerModel):
    """BERT encoder: `model(input_ids, attention_mask=None, token_type_ids=None)` -> hidden states (B, T, C)."""

    model_type = "bert"
    config_class = BertConfig

    def __init__(self, config: BertConfig):
        if not isinstance(config, BertConfig):
            raise TypeError(f"Bert needs a BertConfig, got {type(config).__name__}")
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.pos_embeddings = nn.Embedding(config.max_seq_len, config.hidden_size)
        # Post-LN never normalises the sum of the embeddings on its way into block 1, so it is done here.
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if config.pooler else None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> one vector per position (B, T, C), each computed from the whole sequence.

        `attention_mask` (B, T) is 1 for tokens and 0 for padding; `token_type_ids` (B, T) says which segment
        each token belongs to (all 0 if not given).
        """
        B, T = self.check_inputs(input_ids, attention_mask)
        if T > self.config.max_seq_len:
            raise ValueError(f"Bert: the input has {T} positions but max_seq_len={self.config.max_seq_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif (not isinstance(token_type_ids, torch.Tensor) or token_type_ids.shape != input_ids.shape
              or token_type_ids.min() < 0 or token_type_ids.max() >= self.config.type_vocab_size):
            raise ValueError(f"Bert: token_type_ids must be a (B, T) tensor like input_ids with values in "
                             f"[0, {self.config.type_vocab_size})")
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        # Summed in HF's order: float addition is not associative, and we want the same bits.
        x = self.tok_embeddings(input_ids) + self.type_embeddings(token_type_ids)  # (B, T, C)
        x = self.dropout(self.embed_norm(x + self.pos_embeddings(positions)))  # (B, T, C)
        # No causal triangle: every query may see every key that is not padding.
        mask = None if attention_mask is None else padding_mask(attention_mask)  # (B, 1, 1, T)
        return self.run_blocks(x, mask)  # (B, T, C)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, C): tanh(W h_0 + b) on the first position ([CLS]), BERT's sentence vector."""
        if self.pooler is None:
            raise ValueError("Bert.pool: this model was built with pooler=False")
        return torch.tanh(self.pooler(hidden[:, 0]))

    @classmethod
    def from_hf(cls, hf_model) -> "Bert":
        """A Bert with the config and weights of a transformers `BertModel` (see minillm.models.hf)."""
        from minillm.models.hf import bert_from_hf  # imports transformers (seconds), so only when asked
        return bert_from_hf(hf_model)

    def to_hf(self, attn_implementation: str = "eager"):
        """This model as a transformers `BertModel` with the same weights (see minillm.models.hf)."""
        from minillm.models.hf import bert_to_hf
        return bert_to_hf(self, attn_implementation=attn_implementation)
