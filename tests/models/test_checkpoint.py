"""save_pretrained / from_pretrained: a folder with config.json and model.safetensors, never a pickle.

The expected weights and logits are those of the model before saving; the file format is checked with the
safetensors library itself (`safe_open`), and the config with `json`.
"""

import json

import pytest
import torch
from safetensors import safe_open

from minillm.models import Bert, BertConfig, GPT, GPTConfig, Llama, LlamaConfig, from_pretrained

MODELS = {
    "gpt": lambda: GPT(GPTConfig(vocab_size=37, max_seq_len=16, hidden_size=15, num_layers=2, num_heads=3)),
    "llama-tied": lambda: Llama(LlamaConfig(vocab_size=41, hidden_size=12, num_layers=2, num_heads=2,
                                            num_kv_heads=1, intermediate_size=20, tie_word_embeddings=True)),
    "mistral": lambda: Llama(LlamaConfig(vocab_size=29, hidden_size=16, num_layers=1, num_heads=4,
                                         num_kv_heads=2, intermediate_size=18, sliding_window=3,
                                         attention_bias=True, rope_theta=777.0)),
    "bert": lambda: Bert(BertConfig(vocab_size=23, max_seq_len=10, hidden_size=12, num_layers=2, num_heads=3,
                                    intermediate_size=17, type_vocab_size=3)),
}


@pytest.fixture(params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def test_round_trip_keeps_config_weights_and_logits(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    loaded = type(model).from_pretrained(tmp_path / "saved")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert not loaded.training, "from_pretrained returns the model in eval mode, as HF does"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), f"{name} changed in save/load"
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids)), "a loaded model must compute exactly what the saved one did"


def test_generic_loader_picks_the_class(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert type(from_pretrained(tmp_path)) is type(model)


def test_files_are_json_and_safetensors(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.model_type and config["vocab_size"] == model.config.vocab_size
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        for key in keys:
            assert torch.equal(f.get_tensor(key), model.state_dict()[key]), key
    # A tied weight is one tensor under two names: stored once, restored through the tie.
    if isinstance(model, Bert):
        assert keys == set(model.state_dict()), "BERT has no tied weights: every tensor is stored"
        return
    embedding = model.transformer.wte if isinstance(model, GPT) else model.model.embed_tokens
    is_tied = model.lm_head.weight is embedding.weight
    assert set(model.state_dict()) - keys == ({"lm_head.weight"} if is_tied else set()), (
        "lm_head.weight must be stored exactly when it is not tied to the embedding")


def test_tie_survives_loading(tmp_path):
    torch.manual_seed(0)
    MODELS["gpt"]().save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


# ------------------------------------------------------------------------------------------- bad input
def test_wrong_class_is_refused(tmp_path):
    MODELS["mistral"]().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'; this loader builds \\['gpt'\\]"):
        GPT.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        from_pretrained(tmp_path)
    MODELS["gpt"]().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        from_pretrained(tmp_path)


def test_corrupt_or_foreign_config(tmp_path):
    MODELS["gpt"]().save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "n_embd": 15}))  # an HF GPT2Config key
    with pytest.raises(ValueError, match="has key 'n_embd', which GPTConfig does not have"):
        from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "hidden_size": 18}))  # config and weights disagree
    with pytest.raises(ValueError, match="do not fit the model"):
        from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**config, "num_heads": 4}))  # 15 is not divisible by 4
    with pytest.raises(ValueError, match="divisible by num_heads=4"):
        from_pretrained(tmp_path)


def test_corrupt_weights(tmp_path):
    MODELS["gpt"]().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="is damaged or not a safetensors file"):
        from_pretrained(tmp_path)


def test_save_needs_a_minillm_model(tmp_path):
    from minillm.models.checkpoint import save_pretrained
    with pytest.raises(TypeError, match="needs a minillm model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
