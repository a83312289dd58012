"""Bad input across the public API (issue 15): each case must get a clear error naming what was wrong.

One test per case, each feeding the input a new user once fed and asserting the message that now names the
argument, the value and what is allowed. Where the reference library has a say, it runs here too: HF
`tokenizers` and transformers' `GPT2Tokenizer` for the tokenizer file, torch for the optimizer arguments,
bitsandbytes for what NaN does there, HF Llama for inputs past max_seq_len.
"""

import json
import os
import re

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bitsandbytes.functional as bnbF  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minillm import data  # noqa: E402
from minillm.engine.tensor import Tensor  # noqa: E402
from minillm.generation import generate, sample_next_token  # noqa: E402
from minillm.models import GPT, GPTConfig, Llama, LlamaConfig, from_pretrained  # noqa: E402
from minillm.peft import add_lora, load_adapter, save_adapter  # noqa: E402
from minillm.quant import Adam8bit, AdamW8bit, Lion8bit, quantize_4bit, quantize_blockwise  # noqa: E402
from minillm.tokenizer import BPETokenizer  # noqa: E402
from minillm.train import TrainConfig  # noqa: E402

NAN, INF = float("nan"), float("inf")


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=16),
                            **overrides}))


# ------------------------------------------------------------------------------------------- Tensor
@pytest.mark.parametrize("data, shown", [(None, "NoneType None"), ("abc", "str 'abc'"), ([1, None], "list [1, None]"),
                                         ({1: 2}, "dict {1: 2}")])
def test_tensor_of_non_numbers_names_the_input(data, shown):
    with pytest.raises(TypeError, match=rf"Tensor: data must be a number, .* got {re.escape(shown)}"):
        Tensor(data)


# ----------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def small_bpe():
    texts = [story.text for story in data.generate_stories(60, seed=3)]
    return texts, BPETokenizer.train(texts, 400, special_tokens=["<|endoftext|>"])


def test_tokenizer_file_with_string_ids_says_ids_must_be_integers(small_bpe, tmp_path):
    _, ours = small_bpe
    config = ours._to_hf_json()
    config["model"]["vocab"] = {token: str(i) for token, i in config["model"]["vocab"].items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vocab ids must be integers, got '<\|endoftext\|>': '0'"):
        BPETokenizer.load(tmp_path / "tokenizer.json")


def test_tokenizer_json_written_by_transformers_gpt2tokenizer_loads_and_encodes_as_hf(small_bpe, tmp_path):
    """transformers' GPT2Tokenizer writes "continuing_subword_prefix": "" and "end_of_word_suffix": "" (as the
    Hub's gpt2 tokenizer.json does); HF reads "" as null, and so must we."""
    from tokenizers import Tokenizer
    from transformers import GPT2Tokenizer

    texts, ours = small_bpe
    hf = GPT2Tokenizer(vocab=dict(ours.vocab), merges=list(ours.merges))
    hf.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "tokenizer.json"
    model = json.loads(path.read_text())["model"]
    assert (model["continuing_subword_prefix"], model["end_of_word_suffix"]) == ("", ""), (
        "the premise changed: transformers no longer writes empty strings for these fields")

    loaded, reference = BPETokenizer.load(path), Tokenizer.from_file(str(path))
    assert (loaded.vocab, loaded.merges) == (ours.vocab, ours.merges)
    for text in [*texts[:20], " naïve café  🎉\n\tx", "a<|endoftext|>b"]:
        assert loaded.encode(text) == reference.encode(text).ids == hf(text)["input_ids"], text


def test_tokenizer_file_with_a_real_prefix_is_still_refused(small_bpe, tmp_path):
    config = small_bpe[1]._to_hf_json()
    config["model"]["continuing_subword_prefix"] = "##"
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"continuing_subword_prefix is not supported \(expected null or \"\"\), "
                                         r"got '##'"):
        BPETokenizer.load(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("temperature", [NAN, INF, -1.0])
def test_generate_rejects_temperature_that_is_not_a_finite_number_ge_0(temperature):
    with pytest.raises(ValueError, match=rf"generate: temperature must be a number >= 0, not nan or inf "
                                         rf"\(0 means greedy\), got {temperature}"):
        generate(tiny_gpt(), torch.zeros(1, 3, dtype=torch.long), 2, temperature=temperature)


@pytest.mark.parametrize("temperature", [-1.0, NAN])
def test_sample_next_token_rejects_negative_or_nan_temperature(temperature):
    with pytest.raises(ValueError, match=rf"sample_next_token: temperature must be a number >= 0.*got {temperature}"):
        sample_next_token(torch.randn(2, 10), temperature=temperature)


def test_sample_next_token_says_logits_must_be_2d():
    with pytest.raises(ValueError, match=r"logits must be a \(B, V\) tensor.*got \(10,\); for one row use "
                                         r"logits\[None\]"):
        sample_next_token(torch.randn(10), temperature=1.0)


# ----------------------------------------------------------------------------------- from_pretrained
@pytest.fixture
def saved_gpt(tmp_path):
    model = tiny_gpt()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_from_pretrained_says_a_truncated_weights_file_is_damaged(saved_gpt):
    _, folder = saved_gpt
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is damaged or not a safetensors file \(.*incomplete"):
        from_pretrained(folder)


def test_from_pretrained_says_a_renamed_pickle_is_not_safetensors(saved_gpt):
    model, folder = saved_gpt
    torch.save(model.state_dict(), folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is damaged or not a safetensors file"):
        from_pretrained(folder)


def test_from_pretrained_names_a_config_that_is_not_utf8(saved_gpt):
    _, folder = saved_gpt
    (folder / "config.json").write_bytes(b'{"model_type": "gpt", "name": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"from_pretrained: .*config.json is not valid UTF-8 JSON"):
        from_pretrained(folder)


def test_from_pretrained_checks_a_huge_config_against_the_file_before_allocating(saved_gpt):
    """vocab_size=10**12 would need 64 TB; building it would fail with an allocation error (or worse). The
    header check must come first and name the disagreement."""
    _, folder = saved_gpt
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 10**12}))
    with pytest.raises(ValueError, match=r"transformer.wte.weight has shape \(64, 16\) in the file but "
                                         r"\(1000000000000, 16\) in the model"):
        from_pretrained(folder)


def test_llama_reads_past_max_seq_len_as_hf_llama_does():
    """Documented same-as-reference behaviour (LlamaConfig): RoPE has no table, so neither side refuses."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    sizes = dict(vocab_size=32, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32)
    ours = Llama(LlamaConfig(**sizes, num_layers=1, max_seq_len=8))
    theirs = LlamaForCausalLM(HFLlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                            max_position_embeddings=8))
    ids = torch.zeros(1, 9, dtype=torch.long)  # one token past
    assert ours(ids).shape == theirs(input_ids=ids).logits.shape == (1, 9, 32)


# -------------------------------------------------------------------------------------- load_adapter
@pytest.fixture
def saved_adapter(tmp_path):
    model = add_lora(tiny_gpt(), r=2, alpha=4, target_modules=["c_attn"])
    save_adapter(model, tmp_path)
    return tmp_path


def edit_adapter_config(folder, change):
    config = json.loads((folder / "adapter_config.json").read_text())
    change(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("text, message", [
    ("{not json", r"load_adapter: .*adapter_config.json is not valid UTF-8 JSON"),
    ("[1, 2]", r"load_adapter: .*adapter_config.json must hold a JSON object, got a list"),
])
def test_load_adapter_names_a_config_that_is_not_a_json_object(saved_adapter, text, message):
    (saved_adapter / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_gpt(), saved_adapter)


@pytest.mark.parametrize("key", ["target_modules", "lora_alpha", "r"])
def test_load_adapter_names_a_missing_key(saved_adapter, key):
    edit_adapter_config(saved_adapter, lambda config: config.pop(key))
    with pytest.raises(ValueError, match=rf"adapter_config.json lacks \['{key}'\]; a LoRA adapter_config.json names"):
        load_adapter(tiny_gpt(), saved_adapter)


def test_load_adapter_names_target_modules_of_the_wrong_type(saved_adapter):
    edit_adapter_config(saved_adapter, lambda config: config.update(target_modules=5))
    with pytest.raises(ValueError, match=r"target_modules in .* must be a list of layer names or one regular "
                                         r"expression \(a string\), got 5"):
        load_adapter(tiny_gpt(), saved_adapter)


# ----------------------------------------------------------------------------------------- NaN in quant
def with_nan(n=1000, at=5, value=NAN):
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    x[at] = value
    return x


@pytest.mark.parametrize("value", [NAN, INF])
def test_quantize_blockwise_names_the_nan(value):
    with pytest.raises(ValueError, match=rf"quantize_blockwise: x holds 1 NaN or infinite value\(s\), the first at "
                                         rf"flat index 5 \({value}\); only finite values can be quantized"):
        quantize_blockwise(with_nan(value=value), blocksize=256)


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_quantize_4bit_names_the_nan(compress_statistics):
    with pytest.raises(ValueError, match=r"quantize_4bit: x holds 1 NaN or infinite value\(s\), the first at flat "
                                         r"index 5 \(nan\)"):
        quantize_4bit(with_nan(), 64, "nf4", compress_statistics=compress_statistics)


def test_bitsandbytes_takes_nan_without_a_word():
    """Why we raise instead of following the reference: bitsandbytes 0.50 accepts a NaN and returns values that
    do not round-trip (blockwise: the NaN comes back as code[0] * absmax, about -absmax; 4-bit with double
    quantization: every value of the tensor comes back NaN)."""
    x = with_nan()
    codes, state = bnbF.quantize_blockwise(x, blocksize=256)
    back = bnbF.dequantize_blockwise(codes, state)
    assert back[5] == state.code[0] * state.absmax[0]
    packed, state4 = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert bnbF.dequantize_4bit(packed, state4).isnan().all()


@pytest.mark.parametrize("optimizer_class", [Adam8bit, Lion8bit])
def test_8bit_step_with_a_nan_gradient_names_it_and_changes_nothing(optimizer_class):
    small, big = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4096))
    optimizer = optimizer_class([small, big])
    small.grad, big.grad = torch.randn(3), with_nan(4096, at=7)
    before = [small.detach().clone(), big.detach().clone()]
    with pytest.raises(ValueError, match=rf"{optimizer_class.__name__}.step: the gradient of parameter 1 "
                                         r"\(shape \(4096,\)\) holds 1 NaN or infinite value\(s\); no parameter "
                                         r"was updated"):
        optimizer.step()
    assert torch.equal(small, before[0]) and torch.equal(big.nan_to_num(), before[1].nan_to_num())
    assert not optimizer.state, "a refused step must not start any state"


@pytest.mark.parametrize("optimizer_class, key", [(Adam8bit, "lr"), (Adam8bit, "eps"), (AdamW8bit, "weight_decay"),
                                                  (Lion8bit, "lr")])
def test_8bit_optimizers_reject_nan_hyperparameters_as_torch_does(optimizer_class, key):
    with pytest.raises(ValueError, match=r"Invalid .*: nan"):  # the reference refuses it too
        torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))], **{key: NAN})
    with pytest.raises(ValueError, match=rf"{optimizer_class.__name__}: {key} must be a number >= 0, got nan"):
        optimizer_class([torch.nn.Parameter(torch.randn(2))], **{key: NAN})


# ------------------------------------------------------------------------------------- kernels.matmul_4bit
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_matmul_4bit_checks_the_absmax_length_as_dequantize_4bit_does(compress_statistics):
    from dataclasses import replace

    from minillm.quant import kernels

    packed, state = quantize_4bit(torch.randn(8, 128), 64, "nf4", compress_statistics=compress_statistics)
    short = replace(state, absmax=state.absmax[:-1])
    dtype = "torch.uint8" if compress_statistics else "torch.float32"
    message = rf"1024 values in blocks of 64 need a \(16,\) {dtype} absmax, got {dtype} \(15,\)"
    with pytest.raises(ValueError, match="kernels.dequantize_4bit: " + message):
        kernels.dequantize_4bit(packed, short)
    with pytest.raises(ValueError, match="kernels.matmul_4bit: " + message):
        kernels.matmul_4bit(torch.randn(2, 128), packed, short)
    if compress_statistics:
        with pytest.raises(ValueError, match=r"kernels.matmul_4bit: 16 absmax codes in blocks of 256 need a \(1,\) "
                                             r"torch.float32 nested_absmax, got torch.float32 \(0,\)"):
            kernels.matmul_4bit(torch.randn(2, 128), packed, replace(state, nested_absmax=state.nested_absmax[:0]))


# ------------------------------------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize("field, value, allowed", [
    ("eval_every", 0, "an int >= 1"),
    ("steps", -5, "an int >= 1"),
    ("batch_size", 0, "an int >= 1"),
    ("block_size", 2.0, "an int >= 1"),
    ("grad_accum_steps", 0, "an int >= 1"),
    ("warmup_steps", -1, "an int >= 0"),
    ("seed", -1, "an int >= 0"),
    ("warmup_steps", 1000, r"less than steps=1000 \(the warmup is part of the run\)"),
    ("max_lr", NAN, "a finite number > 0"),
    ("max_lr", 0.0, "a finite number > 0"),
    ("min_lr", 1.0, r"a number in \[0, max_lr=0.003\] \(where the cosine decay ends\)"),
    ("weight_decay", -0.1, "a finite number >= 0"),
    ("grad_clip", NAN, r"a finite number >= 0 \(0 turns clipping off\)"),
    ("betas", (0.9,), r"a pair \(beta1, beta2\) of numbers in \[0, 1\)"),
    ("betas", (0.9, 1.0), r"a pair \(beta1, beta2\) of numbers in \[0, 1\)"),
    ("eval_windows", 0, r"None \(the whole val split\) or an int >= 1"),
    ("bf16", 1, "True or False"),
    ("gradient_checkpointing", "yes", "True or False"),
    ("show_progress", None, "True or False"),
])
def test_train_config_names_the_bad_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"TrainConfig: {field} must be {allowed}, got {re.escape(repr(value))}"):
        TrainConfig(**{field: value})
