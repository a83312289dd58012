"""minillm.peft.adapters: LoRA adapters interchanged with PEFT 0.21.2 in both directions (chapter 09).

The reference runs here: an adapter minillm saves is loaded by `PeftModel.from_pretrained` into the model's
HF twin, and an adapter PEFT saves (`save_pretrained`) is loaded by minillm; the logits must be `torch.equal`
(eager attention). Bad files (another architecture, another size, another PEFT method) must be refused
with an error that names the mismatch, before the model is changed.
"""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model

from minillm.models import GPT, Bert, BertConfig, GPTConfig
from minillm.peft import add_lora, load_adapter, lora_state_dict, save_adapter

pytestmark = [pytest.mark.filterwarnings("ignore:.*fan_in_fan_out"),  # PEFT's note that GPT-2 uses Conv1D
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # transformers, called by PEFT
              pytest.mark.filterwarnings("ignore:.*script_method")]  # torch.jit, imported by PEFT


def ids_for(model, seed=0, B=2, T=9):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(ours, theirs, ids, what):
    with torch.no_grad():
        logits, expected = ours.eval()(ids), theirs.eval()(input_ids=ids).logits
    if not torch.equal(logits, expected):
        pytest.fail(f"{what}: logits differ, max|Δ| = {(logits - expected).abs().max().item():.3g}; the adapter's "
                    "names, shapes, alpha or rsLoRA flag did not survive the file")


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_minillm_adapter_loads_in_peft(arch, use_rslora, twins, fill_lora_B, tmp_path):
    _, ours, targets = twins(arch)
    hf_twin = ours.to_hf()  # before add_lora: the twin is the plain model
    add_lora(ours, r=4, alpha=8, target_modules=targets, dropout=0.05, use_rslora=use_rslora)
    fill_lora_B(ours)
    save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(hf_twin, tmp_path)
    assert_same_logits(ours, theirs, ids_for(ours), f"minillm -> PEFT ({arch})")
    config = theirs.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (4, 8, 0.05, use_rslora)
    assert config.target_modules == set(targets) and config.fan_in_fan_out == (arch == "gpt2")


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_adapter_loads_in_minillm(arch, use_rslora, twins, peft_lora, fill_lora_B, tmp_path):
    hf, ours, targets = twins(arch)
    theirs = peft_lora(hf, targets, r=4, alpha=16, dropout=0.1, use_rslora=use_rslora)
    fill_lora_B(theirs)
    theirs.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    assert_same_logits(ours, theirs, ids_for(ours), f"PEFT -> minillm ({arch})")
    layer = ours.get_submodule(next(iter(lora_state_dict(ours))).rpartition(".lora_")[0])
    assert (layer.r, layer.alpha, layer.lora_dropout.p, layer.use_rslora) == (4, 16, 0.1, use_rslora)


def test_round_trip_and_partial_targets(twins, fill_lora_B, tmp_path):
    """["attn.c_proj"] must not become ["c_proj"] in the file: that would also wrap mlp.c_proj in PEFT."""
    _, ours, _ = twins("gpt2")
    hf_twin, fresh = ours.to_hf(), GPT.from_hf(ours.to_hf())
    add_lora(ours, r=2, alpha=4, target_modules=["attn.c_proj"])
    fill_lora_B(ours)
    save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved == [f"transformer.h.{i}.attn.c_proj" for i in range(2)], f"target_modules saved as {saved}"
    theirs = PeftModel.from_pretrained(hf_twin, tmp_path)
    assert_same_logits(ours, theirs, ids_for(ours), "partial targets, minillm -> PEFT")
    load_adapter(fresh, tmp_path)
    assert lora_state_dict(fresh).keys() == lora_state_dict(ours).keys()
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(fresh).values(), lora_state_dict(ours).values()))


# ------------------------------------------------------------------------------------------ bad input
def test_adapter_for_another_architecture(twins, peft_lora, tmp_path):
    hf_llama, _, llama_targets = twins("llama")
    peft_lora(hf_llama, llama_targets, r=4, alpha=8).save_pretrained(tmp_path)
    _, gpt, _ = twins("gpt2")
    with pytest.raises(ValueError, match=r"targets \['k_proj', 'o_proj', 'q_proj', 'v_proj'\].*different architecture"):
        load_adapter(gpt, tmp_path)
    assert not lora_state_dict(gpt), "a refused load must leave the model without LoRA layers"


def test_adapter_for_another_size_or_depth(twins, tmp_path):
    _, small, _ = twins("gpt2")
    save_adapter(add_lora(small, r=4, alpha=8, target_modules=["c_attn"]), tmp_path)
    wider = GPT(GPTConfig(vocab_size=64, max_seq_len=32, hidden_size=48, num_layers=2, num_heads=4))
    with pytest.raises(ValueError, match=r"c_attn.lora_A.weight .* has shape \(4, 32\) but this model needs \(4, 48\)"):
        load_adapter(wider, tmp_path)
    deeper = GPT(GPTConfig(vocab_size=64, max_seq_len=32, hidden_size=32, num_layers=3, num_heads=4))
    with pytest.raises(ValueError, match=r"missing \['transformer.h.2.attn.c_attn.lora_A.weight'.*other layers"):
        load_adapter(deeper, tmp_path)
    assert not lora_state_dict(wider) and not lora_state_dict(deeper)


def test_other_peft_methods_are_refused(twins, tmp_path):
    hf, ours, _ = twins("gpt2")
    get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)).save_pretrained(
        tmp_path / "prefix")
    with pytest.raises(ValueError, match="'PREFIX_TUNING' adapter; load_adapter reads LoRA adapters only"):
        load_adapter(ours, tmp_path / "prefix")
    hf, ours, _ = twins("llama")
    get_peft_model(hf, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True"):
        load_adapter(ours, tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_adapter(ours, tmp_path / "nothing")


def test_save_and_load_preconditions(twins, tmp_path):
    _, ours, _ = twins("gpt2")
    with pytest.raises(ValueError, match="no LoRA layers; call add_lora first"):
        save_adapter(ours, tmp_path)
    add_lora(ours, r=4, alpha=8, target_modules=["c_attn"])
    add_lora(ours, r=2, alpha=8, target_modules=["c_fc"])
    with pytest.raises(ValueError, match="differ in"):
        save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        load_adapter(ours, tmp_path)
    bert = Bert(BertConfig(vocab_size=16, max_seq_len=8, hidden_size=8, num_layers=1, num_heads=2,
                           intermediate_size=16))
    with pytest.raises(TypeError, match="Bert names its layers differently"):
        save_adapter(add_lora(bert, r=2, alpha=4, target_modules=["q_proj"]), tmp_path)
