"""Small Hugging Face checkpoints written the way real ones are (transformers' save_pretrained, GPT-2's
tokenizer class), for the tests of minillm.hub and of the chapters' real-model sections."""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.hub import real_text


def write_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on real text, saved by transformers' GPT2TokenizerFast the way GPT-2's own
    tokenizer.json on the Hub was written (with the empty-string `continuing_subword_prefix` and
    `end_of_word_suffix` fields)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(real_text().splitlines(), trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = transformers.GPT2TokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tokenizer.save_pretrained(folder)
    written = json.loads((folder / "tokenizer.json").read_text())["model"]
    assert written["continuing_subword_prefix"] == "" and written["end_of_word_suffix"] == "", "not GPT-2's format"
    return tokenizer


def write_checkpoint(folder: Path, kind: str, n_positions: int = 64) -> transformers.PreTrainedModel:
    """A tiny random GPT-2 ("gpt2") or Llama with tied embeddings ("llama") and its tokenizer, saved in `folder`."""
    torch.manual_seed(0)
    common = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=400, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                                         **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=n_positions,
                                          tie_word_embeddings=True, rope_theta=100000.0, **common)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model
