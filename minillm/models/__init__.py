"""The course's transformer models (chapter 06): GPT-2, Llama/Mistral and the BERT encoder, one file each.

    from minillm.models import GPT, GPTConfig, Llama, LlamaConfig
    model = GPT(GPTConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=128))
    logits = model(input_ids)                    # (B, T) -> (B, T, vocab_size)
    model.save_pretrained("my-model")            # config.json + model.safetensors
    same = from_pretrained("my-model")           # GPT or Llama, whichever was saved
    hf = model.to_hf(); back = GPT.from_hf(hf)   # HF Transformers, via minillm.models.hf

`base.py` holds what both models share, `checkpoint.py` saving and loading, `hf.py` the conversions
(imported only when used: it imports transformers).
"""

from minillm.models import checkpoint
from minillm.models.bert import Bert, BertConfig
from minillm.models.gpt import GPT, GPTConfig
from minillm.models.llama import Llama, LlamaConfig

MODEL_CLASSES = (GPT, Llama, Bert)


def from_pretrained(directory) -> GPT | Llama | Bert:
    """Load a model saved with `save_pretrained`, whichever class its config.json names."""
    return checkpoint.load_pretrained(directory, expected=MODEL_CLASSES)


__all__ = ["Bert", "BertConfig", "GPT", "GPTConfig", "Llama", "LlamaConfig", "MODEL_CLASSES", "from_pretrained"]
