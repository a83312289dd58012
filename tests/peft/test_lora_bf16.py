"""bf16 LoRA against PEFT 0.21.2 (issue 14): logits and every LoRA gradient, GPT-2 and Llama.

A bf16 model is not an fp32 model rounded at the end: each family's reference decides in which dtype each op
runs, and the backward follows. HF's GPT-2 takes the attention softmax of bf16 scores in bf16; HF's Llama takes
it in float32 and casts the weights back. The forwards round alike (the logits were equal either way), the
backwards do not: with Llama's choice inside GPT-2, LoRA gradients differed from PEFT's by ~1e-3. Both sides
here run the same torch ops in the same order, so the comparison is `torch.equal`, on any CPU.

The HF models are cast as `from_pretrained(..., dtype=torch.bfloat16)` casts: parameters only, so Llama's
rotary `inv_freq` buffer stays float32 (`.to(bfloat16)` would round it, and every angle with it).
"""

import pytest
import torch

from minillm import attention
from minillm.peft import add_lora

pytestmark = [pytest.mark.filterwarnings("ignore:.*fan_in_fan_out"),  # PEFT's note that GPT-2 uses Conv1D
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # transformers, called by PEFT
              pytest.mark.filterwarnings("ignore:.*script_method")]  # torch.jit, imported by PEFT


def parameters_to_bf16(hf_model):
    """What from_pretrained(..., dtype=torch.bfloat16) gives: bf16 parameters, buffers as the model made them."""
    for p in hf_model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return hf_model


def bf16_lora_pair(arch, twins, peft_lora, lora_params, fill_lora_B, dropout=0.0):
    """(ours, theirs, ours' LoRA parameters, PEFT's): bf16 twins with the same fp32 adapters on the same layers."""
    hf, fp32_twin, targets = twins(arch)
    hf = parameters_to_bf16(hf)
    ours = type(fp32_twin).from_hf(hf).eval()
    assert ours.lm_head.weight.dtype == torch.bfloat16, f"from_hf of a bf16 model gave {ours.lm_head.weight.dtype}"
    torch.manual_seed(0)
    add_lora(ours, r=4, alpha=8, target_modules=targets, dropout=dropout)
    torch.manual_seed(0)
    theirs = peft_lora(hf, targets, r=4, alpha=8, dropout=dropout)
    fill_lora_B(ours), fill_lora_B(theirs)
    ours_params, peft_params = lora_params(ours), lora_params(theirs)
    assert set(ours_params) == set(peft_params)
    for name, p in ours_params.items():
        assert torch.equal(p, peft_params[name]), f"initial {name} differs from PEFT's"
    return ours, theirs, ours_params, peft_params


def logits_and_gradients(forward, ids, params):
    torch.manual_seed(1)  # the same LoRA dropout masks on both sides
    logits = forward(ids)
    logits.logsumexp(-1).mean().backward()
    return logits, {name: p.grad for name, p in params.items()}


def peft_forward(peft_model):
    return lambda ids: peft_model(input_ids=ids).logits


def max_difference(ours: dict, theirs: dict) -> float:
    return max((ours[name].float() - theirs[name].float()).abs().max().item() for name in ours)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_logits_and_lora_gradients_equal_peft(arch, dropout, twins, peft_lora, lora_params, fill_lora_B,
                                                   only_lora_dropout_active):
    ours, theirs, ours_params, peft_params = bf16_lora_pair(arch, twins, peft_lora, lora_params, fill_lora_B, dropout)
    only_lora_dropout_active(ours), only_lora_dropout_active(theirs)
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, grads = logits_and_gradients(ours, ids, ours_params)
    expected, expected_grads = logits_and_gradients(peft_forward(theirs), ids, peft_params)
    assert logits.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(logits, expected), f"bf16 logits differ from PEFT's by {(logits - expected).abs().max():.3g}"
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, f"{name}: LoRA adapters next to a bf16 base are fp32, as in PEFT"
        assert torch.equal(grad, expected_grads[name]), (
            f"gradient of {name} differs from PEFT's by {(grad - expected_grads[name]).abs().max():.3g}: in bf16 the "
            "attention softmax must run in each family's dtype (GPT-2: bf16; Llama: float32, cast back)")


def test_gpt2_softmax_in_float32_would_change_the_gradients(twins, peft_lora, lora_params, fill_lora_B, monkeypatch):
    """The test above can fail: GPT-2 with Llama's float32 softmax gets other LoRA gradients than PEFT's."""
    ours, theirs, ours_params, peft_params = bf16_lora_pair("gpt2", twins, peft_lora, lora_params, fill_lora_B)
    package_attention = attention.scaled_dot_product_attention

    def llama_softmax(q, k, v, mask=None, softmax_dtype=None, **keywords):
        return package_attention(q, k, v, mask, softmax_dtype=torch.float32, **keywords)

    monkeypatch.setattr(attention, "scaled_dot_product_attention", llama_softmax)
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    _, grads = logits_and_gradients(ours, ids, ours_params)
    _, expected_grads = logits_and_gradients(peft_forward(theirs), ids, peft_params)
    assert max_difference(grads, expected_grads) > 1e-5, "a float32 softmax in bf16 GPT-2 left the gradients equal"
