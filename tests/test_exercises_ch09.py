"""Chapter 09's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
from torch import nn

pytest.importorskip("peft")
from minillm.exercises import ch09  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402


# --- 9.1 the LoRA forward ---------------------------------------------------------------------------


def lora_forward(x, weight, bias, A, B, scaling):
    return x @ weight.T + bias + (x @ A.T) @ B.T * scaling


def lora_forward_unscaled(x, weight, bias, A, B, scaling):  # forgets alpha / r
    return x @ weight.T + bias + (x @ A.T) @ B.T


def test_lora_forward_check(capsys):
    passed, stubbed, wrong = run_three(ch09.check_lora_forward, lora_forward, lora_forward_unscaled, capsys)
    assert passed == "Exercise 9.1 (the LoRA forward): passed ✓"
    assert stubbed.startswith("Exercise 9.1 (the LoRA forward): not attempted yet")
    # Case 1 has alpha = r = 1 (scaling 1), so forgetting the scale only shows from case 2 on.
    assert wrong.startswith("Exercise 9.1 (the LoRA forward): not yet ✗ - case 2: lora_forward on x of shape "
                            "(2, 7, 8), r=2, alpha=4: first mismatch at index")


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
