"""Chapter 09's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
from minillm.exercises import ch09, use  # noqa: E402
from minillm.peft import LoRALinear  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402

ORIGINAL_FORWARD = LoRALinear.__dict__["forward"]


# --- 9.1 LoRALinear forward (build) ------------------------------------------------------------------


def lora_linear_forward(self, x):
    result = self.base(x)  # (..., out)
    if self.merged:
        return result
    return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def lora_linear_forward_without_scale(self, x):  # forgets alpha / r
    result = self.base(x)
    return result if self.merged else result + self.lora_B(self.lora_A(self.lora_dropout(x)))


def test_lora_linear_forward_check(capsys):
    passed, stubbed, wrong = run_three(ch09.check_lora_linear_forward, lora_linear_forward,
                                       lora_linear_forward_without_scale, capsys)
    assert passed == "Exercise 9.1 (LoRALinear forward): passed ✓"
    assert stubbed.startswith("Exercise 9.1 (LoRALinear forward): not attempted yet")
    # Case 1 has alpha = r = 1 (scaling 1), so forgetting the scale only shows from case 2 on.
    assert wrong.startswith("Exercise 9.1 (LoRALinear forward): not yet ✗ - case 2: forward on x of shape "
                            "(2, 7, 8), r=2, alpha=4: first mismatch at index")


def test_lora_linear_forward_check_catches_skipped_dropout_and_double_merge(capsys):
    ch09.check_lora_linear_forward(lambda self, x: self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling)
    (line,) = outputs(capsys)
    assert "case 5: forward on x of shape (3, 5, 12), r=2, alpha=8, dropout 0.3 in train mode: first mismatch" in line


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_plugged_in_solution_matches_peft(capsys):
    with use(lora_forward=lora_linear_forward):
        assert ch09.end_to_end_lora()
    assert last_line(capsys).endswith("loads in PEFT with equal logits, bit for bit: ✓")


def test_plugged_in_wrong_forward_fails(capsys):
    with use(lora_forward=lora_linear_forward_without_scale):
        assert not ch09.end_to_end_lora()
    assert "bit for bit: ✗ - logits differ: max |difference|" in last_line(capsys)


def reference_logits():
    ours, _, _, ids = ch09._lora_and_peft_twins()
    with torch.no_grad():
        return ours(ids)


def test_plug_in_restores_the_package(capsys):
    before = reference_logits()
    with use(lora_forward=stub):
        ch09.end_to_end_lora()
    assert "plug-in skipped" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        with use(lora_forward=lora_linear_forward_without_scale):
            assert not torch.equal(reference_logits(), before)  # the swap is live inside the block
            raise RuntimeError("a cell failed")
    assert LoRALinear.__dict__["forward"] is ORIGINAL_FORWARD
    assert torch.equal(reference_logits(), before)


# --- 9.2 the scale ----------------------------------------------------------------------------------


def lora_scaling(alpha, r, use_rslora):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_scaling_ignores_rslora(alpha, r, use_rslora):
    return alpha / r


def test_lora_scaling_check(capsys):
    passed, stubbed, wrong = run_three(ch09.check_lora_scaling, lora_scaling, lora_scaling_ignores_rslora, capsys)
    assert passed == "Exercise 9.2 (the scale, with and without rsLoRA): passed ✓"
    assert stubbed.startswith("Exercise 9.2 (the scale, with and without rsLoRA): not attempted yet")
    assert wrong == ("Exercise 9.2 (the scale, with and without rsLoRA): not yet ✗ - case 2: "
                     f"lora_scaling(alpha=16, r=8, use_rslora=True): expected {16 / math.sqrt(8):.6g}, got 2")


def test_lora_scaling_check_rejects_a_tensor_or_bool(capsys):
    ch09.check_lora_scaling(lambda alpha, r, use_rslora: True)
    assert outputs(capsys)[0].endswith("expected a number, got bool")


# --- 9.3 merge ---------------------------------------------------------------------------------------


def merge_weight(weight, A, B, scaling, fan_in_fan_out):
    delta = B @ A * scaling  # (out, in)
    return weight + (delta.T if fan_in_fan_out else delta)


def merge_weight_no_transpose(weight, A, B, scaling, fan_in_fan_out):  # forgets Conv1D's (in, out) layout
    return weight + (B @ A * scaling).reshape(weight.shape)


def test_merge_weight_check(capsys):
    passed, stubbed, wrong = run_three(ch09.check_merge_weight, merge_weight, merge_weight_no_transpose, capsys)
    assert passed == "Exercise 9.3 (merge the adapter into the weight): passed ✓"
    assert stubbed.startswith("Exercise 9.3 (merge the adapter into the weight): not attempted yet")
    assert wrong.startswith("Exercise 9.3 (merge the adapter into the weight): not yet ✗ - case 2: merge_weight "
                            "for a Conv1D weight (in, out) of 8 -> 24, r=3: first mismatch at index")


# --- 9.4 counting ------------------------------------------------------------------------------------


def count_lora_parameters(model, r, target_modules):
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name.endswith("." + t) for t in target_modules))


def count_lora_parameters_square(model, r, target_modules):  # as if every layer were (in, in)
    return sum(2 * r * m.in_features for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name.endswith("." + t) for t in target_modules))


def test_count_lora_parameters_check(capsys):
    passed, stubbed, wrong = run_three(ch09.check_count_lora_parameters, count_lora_parameters,
                                       count_lora_parameters_square, capsys)
    assert passed == "Exercise 9.4 (count the trainable parameters): passed ✓"
    assert stubbed.startswith("Exercise 9.4 (count the trainable parameters): not attempted yet")
    assert wrong.startswith("Exercise 9.4 (count the trainable parameters): not yet ✗ - case 1: "
                            "count_lora_parameters(GPT {'hidden_size': 16, 'num_layers': 1, 'num_heads': 2}, r=2, "
                            "['c_attn']): expected 128, got 64")
