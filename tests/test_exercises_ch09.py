"""Chapter 09's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import math

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
from minillm.exercises import ch09, use  # noqa: E402
from minillm.peft import LoRALinear, merge_lora  # noqa: E402
from minillm.peft.lora import is_conv1d  # noqa: E402
from exercise_helpers import stub, outputs, run_three  # noqa: E402

ORIGINAL = {name: LoRALinear.__dict__[name] for name in ("forward", "delta_weight")}


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


# --- 9.3 the scale ----------------------------------------------------------------------------------


def lora_scaling(alpha, r, use_rslora):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_scaling_ignores_rslora(alpha, r, use_rslora):
    return alpha / r


def test_lora_scaling_check(capsys):
    passed, stubbed, wrong = run_three(ch09.check_lora_scaling, lora_scaling, lora_scaling_ignores_rslora, capsys)
    assert passed == "Exercise 9.3 (the scale, with and without rsLoRA): passed ✓"
    assert stubbed.startswith("Exercise 9.3 (the scale, with and without rsLoRA): not attempted yet")
    assert wrong == ("Exercise 9.3 (the scale, with and without rsLoRA): not yet ✗ - case 2: "
                     f"lora_scaling(alpha=16, r=8, use_rslora=True): expected {16 / math.sqrt(8):.6g}, got 2")


def test_lora_scaling_check_rejects_a_tensor_or_bool(capsys):
    ch09.check_lora_scaling(lambda alpha, r, use_rslora: True)
    assert outputs(capsys)[0].endswith("expected a number, got bool")


# --- 9.2 delta_weight, for merge and unmerge (build) -------------------------------------------------


def lora_delta_weight(self):
    delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
    return delta.T if is_conv1d(self.base) else delta


def lora_delta_weight_other_order(self):  # right too: the scale folded into A, Conv1D's product formed transposed
    A = self.lora_A.weight * self.scaling
    return A.T @ self.lora_B.weight.T if is_conv1d(self.base) else self.lora_B.weight @ A


def lora_delta_weight_without_scale(self):
    delta = self.lora_B.weight @ self.lora_A.weight
    return delta.T if is_conv1d(self.base) else delta


def lora_delta_weight_reshaped(self):  # forgets that Conv1D's (in, out) layout is a transpose, not a reshape
    return (self.lora_B.weight @ self.lora_A.weight * self.scaling).reshape(self.base.weight.shape)


def lora_delta_weight_always_transposed(self):  # treats every base as a Conv1D
    return (self.lora_B.weight @ self.lora_A.weight * self.scaling).T


TITLE_9_2 = "Exercise 9.2 (LoRALinear delta_weight, for merge and unmerge)"


def test_lora_delta_weight_check(capsys):
    passed, stubbed, wrong = run_three(ch09.check_lora_delta_weight, lora_delta_weight,
                                       lora_delta_weight_without_scale, capsys)
    assert passed == f"{TITLE_9_2}: passed ✓"
    assert stubbed.startswith(f"{TITLE_9_2}: not attempted yet")
    assert wrong.startswith(f"{TITLE_9_2}: not yet ✗ - case 1: delta_weight of a Linear (weight (out, in)) 4 -> 6, "
                            "r=2, alpha=4: first mismatch at index (0, 0)")


def test_lora_delta_weight_check_accepts_another_order_and_rejects_a_reshape(capsys):
    ch09.check_lora_delta_weight(lora_delta_weight_other_order)
    ch09.check_lora_delta_weight(lora_delta_weight_reshaped)
    ch09.check_lora_delta_weight(lora_delta_weight_always_transposed)
    other_order, reshaped, transposed = outputs(capsys)
    assert other_order == f"{TITLE_9_2}: passed ✓"
    assert reshaped.startswith(f"{TITLE_9_2}: not yet ✗ - case 2: delta_weight of a Conv1D (weight (in, out)) "
                               "8 -> 24, r=3, alpha=6: first mismatch at index")
    assert transposed == (f"{TITLE_9_2}: not yet ✗ - case 1: delta_weight of a Linear (weight (out, in)) 4 -> 6, "
                          "r=2, alpha=4: expected shape (6, 4), got shape (4, 6)")


def test_merge_bounds_are_tight_enough_to_matter():
    """The bound allows rounding, not a mistake: with W, A and B entries of size about 1 it stays below 1e-5."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4, 6), r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    assert all(0 < bound.max() < 1e-5 for bound in ch09.merge_bounds(layer))


def test_plugged_in_delta_weight_matches_peft_merge(capsys):
    with use(lora_delta_weight=lora_delta_weight):
        assert ch09.end_to_end_merge()
    assert last_line(capsys).endswith("within the rounding bound: ✓")


def test_plugged_in_wrong_delta_weight_fails(capsys):
    with use(lora_delta_weight=lora_delta_weight_without_scale):
        assert not ch09.end_to_end_merge()
    assert last_line(capsys).endswith("✗ - the merged weight of transformer.h.0.attn.c_attn differs from PEFT's "
                                      "beyond the bound")
    with use(lora_delta_weight=lora_delta_weight_always_transposed):
        assert not ch09.end_to_end_merge()
    assert "✗ - merge_lora with your delta_weight raised RuntimeError" in last_line(capsys)


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


# --- both plug-ins leave the package as it was -------------------------------------------------------


def reference_logits():
    ours, _, _, ids = ch09._lora_and_peft_twins()
    with torch.no_grad():
        return ours(ids)


def merged_reference_weight():
    ours, _, _, _ = ch09._lora_and_peft_twins(use_rslora=True)
    return merge_lora(ours).transformer.h[0].attn.c_attn.weight.detach().clone()


@pytest.mark.parametrize("component, method, end_to_end, wrong, reference", [
    ("lora_forward", "forward", ch09.end_to_end_lora, lora_linear_forward_without_scale, reference_logits),
    ("lora_delta_weight", "delta_weight", ch09.end_to_end_merge, lora_delta_weight_without_scale,
     merged_reference_weight)])
def test_plug_in_restores_the_package(component, method, end_to_end, wrong, reference, capsys):
    before = reference()
    with use(**{component: stub}):
        end_to_end()
    assert "plug-in skipped" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        with use(**{component: wrong}):
            assert not torch.equal(reference(), before)  # the swap is live inside the block
            raise RuntimeError("a cell failed")
    assert LoRALinear.__dict__[method] is ORIGINAL[method]
    assert torch.equal(reference(), before)
