"""Convert between minillm models and HF Transformers' GPT-2, Llama, Mistral and BERT: config and weights.

Chapter 06 teaches this. Our GPT and Llama parameter names are HF's, so a conversion is a config translation
plus a state-dict copy; the only tensors that change shape are GPT-2's four `Conv1D` weights, which are stored
transposed (see `_conv1d_names`). BERT's HF names are long, and `BERT_NAMES` maps ours onto them.

Every HF config option that would change the computation and that our models do not implement is refused
with an error naming the key; options that do not affect the outputs (token ids, label maps, `use_cache`, ...)
are ignored. Both directions keep the dtype and the train/eval mode of the model they start from. `to_hf`
builds HF's eager attention by default: it is the implementation our models match bit for bit (sdpa agrees to
a few 1e-6).
"""

import torch
from torch import nn
from transformers import (BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedModel)
from transformers import BertConfig as HFBertConfig
from transformers import LlamaConfig as HFLlamaConfig
from transformers.pytorch_utils import Conv1D

from minillm.models.bert import Bert, BertConfig
from minillm.models.gpt import GPT, GPTConfig
from minillm.models.llama import Llama, LlamaConfig


def from_hf(hf_model: PreTrainedModel) -> GPT | Llama | Bert:
    """A minillm model with the config and weights of a `GPT2LMHeadModel`, `LlamaForCausalLM`,
    `MistralForCausalLM` or `BertModel`, whichever `hf_model` is."""
    if isinstance(hf_model, GPT2LMHeadModel):
        return gpt_from_hf(hf_model)
    if isinstance(hf_model, (LlamaForCausalLM, MistralForCausalLM)):
        return llama_from_hf(hf_model)
    if isinstance(hf_model, BertModel):
        return bert_from_hf(hf_model)
    raise TypeError(f"from_hf: expected GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM or BertModel, "
                    f"got {type(hf_model).__name__}")


# ------------------------------------------------------------------------------------------------ GPT-2
def _conv1d_names(hf_model: GPT2LMHeadModel) -> set[str]:
    """State-dict keys of the weights HF stores transposed.

    OpenAI's GPT-2 code (TensorFlow) computed `x @ W + b` with W of shape (in, out); HF kept that layout in a
    `Conv1D` module (a 1x1 convolution is a linear layer) so the original checkpoints load unchanged. torch's
    `nn.Linear` computes `x @ W.T + b` with W of shape (out, in). So c_attn (C, 3C), attn.c_proj (C, C),
    mlp.c_fc (C, 4C) and mlp.c_proj (4C, C) are transposed on the way in and out; biases, LayerNorms and
    embeddings are not.
    """
    return {f"{name}.weight" for name, module in hf_model.named_modules() if isinstance(module, Conv1D)}


def _require(hf_config, key: str, allowed, model: str) -> None:
    """Refuse an HF config option our model does not implement, naming the key, its value and what works."""
    value = getattr(hf_config, key, None)
    if value not in allowed:
        allowed_text = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"{model}.from_hf: config.{key}={value!r} is not supported (minillm's {model} "
                         f"implements only {key}={allowed_text})")


def gpt_from_hf(hf_model: GPT2LMHeadModel) -> GPT:
    """A `GPT` whose logits equal `hf_model`'s (bit for bit against eager attention)."""
    if not isinstance(hf_model, GPT2LMHeadModel):
        raise TypeError(f"GPT.from_hf: expected a transformers GPT2LMHeadModel, got {type(hf_model).__name__}"
                        + ("; use Llama.from_hf" if isinstance(hf_model, (LlamaForCausalLM, MistralForCausalLM))
                           else ""))
    c = hf_model.config
    _require(c, "activation_function", ["gelu_new"], "GPT")
    _require(c, "scale_attn_weights", [True], "GPT")
    _require(c, "scale_attn_by_inverse_layer_idx", [False], "GPT")
    _require(c, "reorder_and_upcast_attn", [False], "GPT")
    _require(c, "add_cross_attention", [False], "GPT")
    _require(c, "tie_word_embeddings", [True], "GPT")
    # HF has three dropout rates, we have one: take them only when they agree.
    for key in ("embd_pdrop", "attn_pdrop"):
        if getattr(c, key) != c.resid_pdrop:
            raise ValueError(f"GPT.from_hf: config.{key}={getattr(c, key)!r} differs from "
                             f"config.resid_pdrop={c.resid_pdrop!r}; minillm's GPT has one dropout rate for all three")
    config = GPTConfig(vocab_size=c.vocab_size, max_seq_len=c.n_positions, hidden_size=c.n_embd,
                       num_layers=c.n_layer, num_heads=c.n_head, intermediate_size=c.n_inner,
                       dropout=c.resid_pdrop, layer_norm_eps=c.layer_norm_epsilon)
    transposed = _conv1d_names(hf_model)
    state = {k: v.t() if k in transposed else v for k, v in hf_model.state_dict().items()}
    return _load(GPT(config), state, hf_model)


def gpt_to_hf(model: GPT, attn_implementation: str = "eager") -> GPT2LMHeadModel:
    """A `GPT2LMHeadModel` with `model`'s config and weights; the Conv1D weights transposed back."""
    if not isinstance(model, GPT):
        raise TypeError(f"gpt_to_hf: expected a minillm GPT, got {type(model).__name__}")
    c = model.config
    hf_config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.hidden_size,
                           n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.intermediate_size,
                           activation_function="gelu_new", layer_norm_epsilon=c.layer_norm_eps,
                           resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                           # GPT-2's default ids (50256) do not exist in a smaller vocabulary.
                           bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
                           attn_implementation=attn_implementation)
    hf_model = GPT2LMHeadModel(hf_config)
    transposed = _conv1d_names(hf_model)
    state = {k: v.t() if k in transposed else v for k, v in model.state_dict().items()}
    return _load(hf_model, state, model)


# ----------------------------------------------------------------------------------------- Llama, Mistral
def llama_from_hf(hf_model: LlamaForCausalLM | MistralForCausalLM) -> Llama:
    """A `Llama` whose logits equal `hf_model`'s; a Mistral's sliding window comes along in the config."""
    if not isinstance(hf_model, (LlamaForCausalLM, MistralForCausalLM)):
        raise TypeError(f"Llama.from_hf: expected a transformers LlamaForCausalLM or MistralForCausalLM, "
                        f"got {type(hf_model).__name__}"
                        + ("; use GPT.from_hf" if isinstance(hf_model, GPT2LMHeadModel) else ""))
    c = hf_model.config
    _require(c, "hidden_act", ["silu"], "Llama")
    rope = dict(c.rope_parameters)
    if rope.get("rope_type") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        raise ValueError(f"Llama.from_hf: config.rope_parameters={rope!r} is not supported (minillm's Llama "
                         "implements only rope_type 'default', with rope_theta and no scaling)")
    config = LlamaConfig(vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings,
                         hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                         num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                         head_dim=getattr(c, "head_dim", None), intermediate_size=c.intermediate_size,
                         rms_norm_eps=c.rms_norm_eps, rope_theta=rope["rope_theta"],
                         # Llama has no sliding_window; a Mistral config with None attends to everything.
                         sliding_window=getattr(c, "sliding_window", None),
                         tie_word_embeddings=c.tie_word_embeddings,
                         attention_bias=getattr(c, "attention_bias", False), mlp_bias=getattr(c, "mlp_bias", False),
                         attention_dropout=c.attention_dropout)
    return _load(Llama(config), hf_model.state_dict(), hf_model)


def llama_to_hf(model: Llama, attn_implementation: str = "eager") -> LlamaForCausalLM | MistralForCausalLM:
    """`MistralForCausalLM` if `model` has a sliding window, else `LlamaForCausalLM`; same names, no transposes."""
    if not isinstance(model, Llama):
        raise TypeError(f"llama_to_hf: expected a minillm Llama, got {type(model).__name__}")
    c = model.config
    common = dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len, hidden_size=c.hidden_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                  hidden_act="silu", rms_norm_eps=c.rms_norm_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                  tie_word_embeddings=c.tie_word_embeddings, attention_dropout=c.attention_dropout,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  attn_implementation=attn_implementation)
    if c.sliding_window is None:
        hf_model = LlamaForCausalLM(HFLlamaConfig(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, **common))
    else:
        for key in ("attention_bias", "mlp_bias"):
            if getattr(c, key):
                raise ValueError(f"Llama.to_hf: {key}=True with a sliding_window has no HF equivalent "
                                 "(MistralForCausalLM has no biases)")
        hf_model = MistralForCausalLM(MistralConfig(sliding_window=c.sliding_window, **common))
    return _load(hf_model, model.state_dict(), model)


# ------------------------------------------------------------------------------------------------- BERT
BERT_NAMES = {  # our module name -> HF BertModel's ({i}: the layer index)
    "tok_embeddings": "embeddings.word_embeddings",
    "pos_embeddings": "embeddings.position_embeddings",
    "type_embeddings": "embeddings.token_type_embeddings",
    "embed_norm": "embeddings.LayerNorm",
    "layers.{i}.attn.q_proj": "encoder.layer.{i}.attention.self.query",
    "layers.{i}.attn.k_proj": "encoder.layer.{i}.attention.self.key",
    "layers.{i}.attn.v_proj": "encoder.layer.{i}.attention.self.value",
    "layers.{i}.attn.o_proj": "encoder.layer.{i}.attention.output.dense",
    "layers.{i}.attn_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "layers.{i}.fc_in": "encoder.layer.{i}.intermediate.dense",
    "layers.{i}.fc_out": "encoder.layer.{i}.output.dense",
    "layers.{i}.mlp_norm": "encoder.layer.{i}.output.LayerNorm",
    "pooler": "pooler.dense",
}


def _rename(state: dict[str, torch.Tensor], num_layers: int, to_hf: bool) -> dict[str, torch.Tensor]:
    """Rename a BERT state dict's keys module by module with BERT_NAMES, in either direction."""
    names = {}
    for ours, theirs in BERT_NAMES.items():
        for i in range(num_layers if "{i}" in ours else 1):
            names[ours.format(i=i)] = theirs.format(i=i)
    if not to_hf:
        names = {theirs: ours for ours, theirs in names.items()}
    renamed = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")  # "layers.0.fc_in", "weight"
        renamed[f"{names.get(module, module)}.{param}"] = tensor
    return renamed


def bert_from_hf(hf_model: BertModel) -> Bert:
    """A `Bert` whose hidden states (and pooled output) equal `hf_model`'s (bit for bit against eager)."""
    if not isinstance(hf_model, BertModel):
        raise TypeError(f"Bert.from_hf: expected a transformers BertModel, got {type(hf_model).__name__}"
                        + ("; pass its encoder, model.bert" if hasattr(hf_model, "bert") else ""))
    c = hf_model.config
    _require(c, "hidden_act", ["gelu"], "Bert")
    _require(c, "is_decoder", [False], "Bert")
    _require(c, "add_cross_attention", [False], "Bert")
    _require(c, "chunk_size_feed_forward", [0], "Bert")
    if c.attention_probs_dropout_prob != c.hidden_dropout_prob:
        raise ValueError(f"Bert.from_hf: config.attention_probs_dropout_prob={c.attention_probs_dropout_prob!r} "
                         f"differs from config.hidden_dropout_prob={c.hidden_dropout_prob!r}; minillm's Bert has "
                         "one dropout rate")
    config = BertConfig(vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings,
                        type_vocab_size=c.type_vocab_size, hidden_size=c.hidden_size,
                        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                        intermediate_size=c.intermediate_size, dropout=c.hidden_dropout_prob,
                        layer_norm_eps=c.layer_norm_eps, pooler=hf_model.pooler is not None)
    return _load(Bert(config), _rename(hf_model.state_dict(), config.num_layers, to_hf=False), hf_model)


def bert_to_hf(model: Bert, attn_implementation: str = "eager") -> BertModel:
    """A `BertModel` with `model`'s config and weights (with a pooler exactly when `model` has one)."""
    if not isinstance(model, Bert):
        raise TypeError(f"bert_to_hf: expected a minillm Bert, got {type(model).__name__}")
    c = model.config
    hf_config = HFBertConfig(vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len,
                             type_vocab_size=c.type_vocab_size, hidden_size=c.hidden_size,
                             num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                             intermediate_size=c.intermediate_size, hidden_act="gelu",
                             hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
                             layer_norm_eps=c.layer_norm_eps, attn_implementation=attn_implementation)
    hf_model = BertModel(hf_config, add_pooling_layer=c.pooler)
    return _load(hf_model, _rename(model.state_dict(), c.num_layers, to_hf=True), model)


# --------------------------------------------------------------------------------------------- shared
def _load(target: nn.Module, state: dict[str, torch.Tensor], source: nn.Module) -> nn.Module:
    """Copy `state` into `target` (every key must match) and give it `source`'s dtype and train/eval mode.

    Only the parameters take the dtype, as in `from_pretrained(..., dtype=...)`: buffers a model computes for
    itself keep the dtype it gave them. `target.to(dtype)` would round HF Llama's rotary `inv_freq` (fp32 by
    design) to bf16, 0.1 to 0.10009765625, and turn every angle position * inv_freq with it.
    """
    dtype = next(source.parameters()).dtype
    for param in target.parameters():  # tied weights are one Parameter: cast once, still tied
        param.data = param.data.to(dtype)
    adapters = [key for key in state if ".lora_" in key]
    if adapters:  # chapter 09's LoRALinear wraps the layer, so the HF names no longer match
        raise ValueError(f"{type(source).__name__} carries LoRA adapters (e.g. {adapters[0]!r}): convert before "
                         f"add_lora, or fold them into the weights first with minillm.peft.merge_lora(model); "
                         f"save_adapter writes the adapters themselves in PEFT's format")
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{type(target).__name__}: weights do not match by name; missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return target.train(source.training)
