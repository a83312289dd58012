"""Chapter 11's checks pass right answers, flag plausible wrong ones and wait for untouched stubs; the LLM.int8()
forward, plugged into minillm, gives the shipped model bitsandbytes' logits and leaves the package as it was."""

import copy

import pytest
import torch

from minillm.exercises import ch11, use
from minillm.pretrained import load_pretrained
from minillm.quant import int8, quantize_model
from exercise_helpers import stub, outputs, run_three


# --- 11.1 LLM.int8() forward (build) ------------------------------------------------------------------


def llm_int8_linear(x, weight_codes, weight_absmax, bias, threshold):
    h = x.to(torch.float16)  # (N, K): the activations are quantized from fp16
    if threshold > 0:
        outliers = h.abs() >= threshold  # (N, K)
        cols = outliers.any(dim=0).nonzero().view(-1)  # (n_out,)
        h = h.masked_fill(outliers, 0)  # the outliers must not set their row's step
    else:
        cols = torch.empty(0, dtype=torch.int64)
    absmax = h.abs().amax(dim=1).float()  # (N,)
    codes = torch.round(h * (127.0 / absmax)[:, None]).to(torch.int8)  # (N, K)
    codes[:, cols] = 0
    acc = codes.to(torch.int32) @ weight_codes.to(torch.int32).t()  # (N, out), exact
    y = acc * (absmax[:, None] * weight_absmax[None, :]) * 6.200124e-05  # fp32
    if bias is not None:
        y = y + bias
    y = y.to(x.dtype)
    if cols.numel() > 0:
        w_cols = (weight_codes[:, cols] * weight_absmax[:, None] * (1 / 127)).to(x.dtype)  # (out, n_out)
        y = y.addmm(x[:, cols], w_cols.t())
    return y


def llm_int8_linear_textbook_constant(x, weight_codes, weight_absmax, bias, threshold):
    """Scales back with 1 / 127**2, the paper's constant; bitsandbytes' CPU code multiplies by 6.200124e-05."""
    h = x.to(torch.float16)
    absmax = h.abs().amax(dim=1).float()
    codes = torch.round(h * (127.0 / absmax)[:, None]).to(torch.int8)
    acc = codes.to(torch.int32) @ weight_codes.to(torch.int32).t()
    y = acc * (absmax[:, None] * weight_absmax[None, :]) * (1 / 127**2)
    return (y if bias is None else y + bias).to(x.dtype)


def test_llm_int8_linear_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_llm_int8_linear, llm_int8_linear,
                                       llm_int8_linear_textbook_constant, capsys)
    assert passed == "Exercise 11.1 (LLM.int8() forward): passed ✓"
    assert stubbed.startswith("Exercise 11.1 (LLM.int8() forward): not attempted yet")
    assert wrong.startswith("Exercise 11.1 (LLM.int8() forward): not yet ✗ - case 1: output for a (4, 32) float32 "
                            "x, threshold 0.0: first mismatch at index (0, ")


def test_llm_int8_linear_check_catches_a_forgotten_outlier_path(capsys):
    ch11.check_llm_int8_linear(lambda x, codes, absmax, bias, threshold:
                               llm_int8_linear(x, codes, absmax, bias, 0.0))  # never decomposes
    (line,) = outputs(capsys)
    assert line.startswith("Exercise 11.1 (LLM.int8() forward): not yet ✗ - case 2: output for a (5, 64) float32 "
                           "x, threshold 6.0: first mismatch")


def test_llm_int8_linear_check_reports_a_wrong_dtype(capsys):
    ch11.check_llm_int8_linear(lambda x, *rest: llm_int8_linear(x, *rest).float())
    (line,) = outputs(capsys)
    assert line.endswith("case 3: output for a (6, 64) float16 x, threshold 6.0, no bias: "
                         "expected dtype torch.float16, got torch.float32")


def shipped_int8_logits():
    model, tokenizer = load_pretrained()
    ids = torch.tensor([tokenizer.encode("Once upon a time, Mia went to the park.")])
    with torch.no_grad():
        return quantize_model(copy.deepcopy(model), "int8", threshold=6.0).eval()(ids)


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_plugged_in_solution_gives_bitsandbytes_logits(capsys):
    with use(llm_int8=llm_int8_linear):
        assert ch11.end_to_end_llm_int8()
    assert last_line(capsys).endswith("bit for bit (thresholds 0.0, 6.0): ✓")


def test_plugged_in_wrong_forward_fails_and_names_the_first_layer(capsys):
    with use(llm_int8=llm_int8_linear_textbook_constant):
        assert not ch11.end_to_end_llm_int8()
    assert "✗ - threshold 0.0: first layer whose output differs is transformer.h.0.attn.c_attn; " in last_line(capsys)


def test_plug_in_restores_the_package(capsys):
    original, before = int8.llm_int8_linear, shipped_int8_logits()
    with use(llm_int8=stub):
        ch11.end_to_end_llm_int8()
    assert "plug-in skipped" in capsys.readouterr().out
    with pytest.raises(RuntimeError):
        with use(llm_int8=llm_int8_linear_textbook_constant):
            assert not torch.equal(shipped_int8_logits(), before)  # the swap is live inside the block
            raise RuntimeError("a cell failed")
    assert int8.llm_int8_linear is original
    assert torch.equal(shipped_int8_logits(), before)


# --- 11.2 absmax per row ------------------------------------------------------------------------------


def absmax_quantize_rows(x):
    scale = x.abs().amax(dim=1, keepdim=True) / 127  # (rows, 1)
    return torch.round(x / scale).to(torch.int8), scale


def absmax_quantize_whole_tensor(x):
    scale = (x.abs().amax() / 127).expand(x.shape[0], 1)  # one scale for every row: too coarse for small rows
    return torch.round(x / scale).to(torch.int8), scale


def test_absmax_quantize_rows_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_absmax_quantize_rows, absmax_quantize_rows,
                                       absmax_quantize_whole_tensor, capsys)
    assert passed == "Exercise 11.2 (absmax per row): passed ✓"
    assert stubbed.startswith("Exercise 11.2 (absmax per row): not attempted yet")
    assert wrong.startswith("Exercise 11.2 (absmax per row): not yet ✗ - case 1: scale of a (4, 8) x: first mismatch")


# --- 11.3 int8 matmul ----------------------------------------------------------------------------------


def int8_matmul(a, b):
    return a.to(torch.int32) @ b.to(torch.int32).t()  # (M, N)


def int8_matmul_through_fp32(a, b):
    return (a.float() @ b.float().t()).to(torch.int32)  # fp32 holds no odd integer above 2**24


def test_int8_matmul_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_int8_matmul, int8_matmul, int8_matmul_through_fp32, capsys)
    assert passed == "Exercise 11.3 (int8 matmul, int32 accumulation): passed ✓"
    assert stubbed.startswith("Exercise 11.3 (int8 matmul, int32 accumulation): not attempted yet")
    assert wrong.startswith("Exercise 11.3 (int8 matmul, int32 accumulation): not yet ✗ - case 4: "
                            "int8_matmul(a (2, 1041), b (3, 1041)): first mismatch at index (0, 0)")


def test_int8_matmul_check_wants_int32(capsys):
    ch11.check_int8_matmul(lambda a, b: a.long() @ b.long().t())
    (line,) = outputs(capsys)
    assert line.endswith("case 1: the accumulator: expected a torch.int32 tensor, got torch.int64")


# --- 11.4 outlier columns ------------------------------------------------------------------------------


def outlier_columns(x, threshold):
    return (x.abs() >= threshold).any(dim=0).nonzero().view(-1)


def outlier_columns_strict(x, threshold):
    return (x.abs() > threshold).any(dim=0).nonzero().view(-1)  # misses a value exactly at the threshold


def test_outlier_columns_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_outlier_columns, outlier_columns, outlier_columns_strict, capsys)
    assert passed == "Exercise 11.4 (outlier columns): passed ✓"
    assert stubbed.startswith("Exercise 11.4 (outlier columns): not attempted yet")
    assert wrong.startswith("Exercise 11.4 (outlier columns): not yet ✗ - case 2: outlier columns of a (3, 9) x, "
                            "threshold=6.0: expected shape (2,), got shape (0,)")


# --- 11.5 zero-point per tensor ------------------------------------------------------------------------


def zeropoint_quantize_tensor(x):
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (high - low) / 255
    zero_point = -128 - torch.round(low / scale).to(torch.int32)
    codes = (torch.round(x / scale) + zero_point).clamp(-128, 127).to(torch.int8)
    return codes, scale, zero_point


def zeropoint_quantize_without_zero(x):
    low, high = x.min(), x.max()  # the range need not hold 0, so 0 may not be exactly representable
    scale = (high - low) / 255
    zero_point = -128 - torch.round(low / scale).to(torch.int32)
    codes = (torch.round(x / scale) + zero_point).clamp(-128, 127).to(torch.int8)
    return codes, scale, zero_point


def test_zeropoint_quantize_tensor_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_zeropoint_quantize_tensor, zeropoint_quantize_tensor,
                                       zeropoint_quantize_without_zero, capsys)
    assert passed == "Exercise 11.5 (zero-point per tensor): passed ✓"
    assert stubbed.startswith("Exercise 11.5 (zero-point per tensor): not attempted yet")
    assert wrong.startswith("Exercise 11.5 (zero-point per tensor): not yet ✗ - case 2: scale of x of shape (3, 7)")


def test_a_crashing_answer_is_reported(capsys):
    ch11.check_outlier_columns(lambda x, threshold: x.nonexistent)
    (line,) = outputs(capsys)
    assert "case 1: your code raised AttributeError" in line
