"""Parameter-efficient fine-tuning (chapters 09-10): LoRA layers, PEFT-format adapter files, prefix and
prompt tuning, and QLoRA (chapter 14).

    from minillm.peft import add_lora, merge_lora, save_adapter, load_adapter
    add_lora(model, r=8, alpha=16, target_modules=["c_attn"])   # only the LoRA weights train
    save_adapter(model, "my-adapter")       # adapter_config.json + adapter_model.safetensors, PEFT's format
    load_adapter(fresh_model, "my-adapter")  # also reads adapters that PEFT trained on the HF twin

`lora.py` holds the layer and the model-level functions, `adapters.py` the file format; `prefix.py` and
`prompt.py` (chapter 10) wrap a frozen model with trainable virtual tokens.
"""

from minillm.peft.adapters import load_adapter, save_adapter
from minillm.peft.lora import LoRALinear, add_lora, lora_state_dict, merge_lora, trainable_parameters
from minillm.peft.prefix import PrefixTuning
from minillm.peft.prompt import PromptTuning
from minillm.peft.qlora import prepare_for_kbit_training, qlora

__all__ = ["LoRALinear", "PrefixTuning", "PromptTuning", "add_lora", "load_adapter", "lora_state_dict", "merge_lora", "prepare_for_kbit_training", "qlora", "save_adapter",
           "trainable_parameters"]
