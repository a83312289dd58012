"""bf16 models both ways: `from_hf` of, and `to_hf` into, what HF's `from_pretrained(..., dtype=torch.bfloat16)` gives.

The reference is HF's own loader run here: a float32 HF model saved with `save_pretrained` and read back with
`from_pretrained(dir, dtype=torch.bfloat16)` (eager attention, as `to_hf` builds), which makes the parameters bf16 and leaves the buffers a model
computes for itself as it built them (Llama's and Mistral's rotary `inv_freq`: fp32). `to_hf` of our bf16
model must give that same HF model, tensor for tensor, buffers included; and our bf16 logits must equal its
logits bit for bit, both ways. Bitwise is the right claim here: our models call the same torch ops in the same
order as HF's eager attention (chapter 06), in bf16 as in fp32, so both sides run the same kernels on any CPU.
"""

import pytest
import torch

from hf_reference import gpt2, llama, token_batch
from minillm.models import GPT, Llama

CONFIGS = {  # (our class, HF reference builder, its config keywords)
    "gpt2": (GPT, gpt2, dict(vocab_size=37, n_positions=16, n_embd=15, n_layer=2, n_head=3)),
    "llama-gqa2": (Llama, llama, dict(vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                                      max_position_embeddings=64)),
    "mistral-w4": (Llama, llama, dict(vocab_size=61, hidden_size=20, intermediate_size=30, num_hidden_layers=2,
                                      num_attention_heads=5, num_key_value_heads=1, head_dim=4, sliding_window=4,
                                      max_position_embeddings=64)),
}
B, T = 3, 15


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    """(our class, HF's bf16 model from from_pretrained, our bf16 model, ids, attention mask)."""
    ours_class, make_reference, sizes = CONFIGS[request.param]
    fp32 = make_reference(**sizes)
    path = tmp_path_factory.mktemp(request.param)
    fp32.save_pretrained(path)
    hf_bf16 = type(fp32).from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours_bf16 = ours_class.from_hf(fp32).to(torch.bfloat16)
    ids, attention_mask = token_batch(sizes["vocab_size"], B=B, T=T)
    return ours_class, hf_bf16, ours_bf16, ids, attention_mask


def assert_logits_equal(got, expected, attention_mask, what):
    real = attention_mask.bool()  # pad queries see no key under left padding: their logits mean nothing
    assert got.dtype == expected.dtype == torch.bfloat16, f"{what}: logits are {got.dtype}, HF's {expected.dtype}"
    assert torch.equal(got[real], expected[real]), \
        f"{what}: bf16 logits differ from HF's by up to {(got - expected)[real].abs().max():.3g}"


def test_to_hf_gives_what_from_pretrained_gives(models):
    _, hf_bf16, ours_bf16, _, _ = models
    converted = ours_bf16.to_hf()
    assert type(converted) is type(hf_bf16)
    expected = dict(hf_bf16.named_parameters()) | dict(hf_bf16.named_buffers())
    got = dict(converted.named_parameters()) | dict(converted.named_buffers())
    assert got.keys() == expected.keys(), f"tensors {sorted(got.keys() ^ expected.keys())} on one side only"
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, (
            f"to_hf: {name} is {got[name].dtype}, from_pretrained(dtype=torch.bfloat16) keeps it {tensor.dtype}; "
            "cast the parameters only, not the buffers a model computes for itself")
        assert torch.equal(got[name], tensor), f"to_hf: {name} differs from from_pretrained's"


def test_to_hf_logits_equal_ours(models):
    _, hf_bf16, ours_bf16, ids, attention_mask = models
    converted = ours_bf16.to_hf().eval()
    with torch.no_grad():
        got = ours_bf16(ids, attention_mask=attention_mask)
        expected = converted(ids, attention_mask=attention_mask).logits
    assert_logits_equal(got, expected, attention_mask, "ours vs to_hf(ours)")


def test_from_hf_logits_equal_hf(models):
    ours_class, hf_bf16, _, ids, attention_mask = models
    ours = ours_class.from_hf(hf_bf16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}, "from_hf must keep HF's bf16"
    with torch.no_grad():
        got = ours(ids, attention_mask=attention_mask)
        expected = hf_bf16(ids, attention_mask=attention_mask).logits
    assert_logits_equal(got, expected, attention_mask, "from_hf(HF bf16) vs HF bf16")
