"""Chapter 11's checks pass right answers, flag plausible wrong ones and wait for untouched stubs."""

import torch

from minillm.exercises import ch11
from exercise_helpers import stub, outputs, run_three


# --- 11.1 absmax per row ------------------------------------------------------------------------------


def absmax_quantize_rows(x):
    scale = x.abs().amax(dim=1, keepdim=True) / 127  # (rows, 1)
    return torch.round(x / scale).to(torch.int8), scale


def absmax_quantize_whole_tensor(x):
    scale = (x.abs().amax() / 127).expand(x.shape[0], 1)  # one scale for every row: too coarse for small rows
    return torch.round(x / scale).to(torch.int8), scale


def test_absmax_quantize_rows_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_absmax_quantize_rows, absmax_quantize_rows,
                                       absmax_quantize_whole_tensor, capsys)
    assert passed == "Exercise 11.1 (absmax per row): passed ✓"
    assert stubbed.startswith("Exercise 11.1 (absmax per row): not attempted yet")
    assert wrong.startswith("Exercise 11.1 (absmax per row): not yet ✗ - case 1: scale of a (4, 8) x: first mismatch")


# --- 11.2 int8 matmul ----------------------------------------------------------------------------------


def int8_matmul(a, b):
    return a.to(torch.int32) @ b.to(torch.int32).t()  # (M, N)


def int8_matmul_through_fp32(a, b):
    return (a.float() @ b.float().t()).to(torch.int32)  # exact only while the sums stay below 2**24


def test_int8_matmul_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_int8_matmul, int8_matmul, int8_matmul_through_fp32, capsys)
    assert passed == "Exercise 11.2 (int8 matmul, int32 accumulation): passed ✓"
    assert stubbed.startswith("Exercise 11.2 (int8 matmul, int32 accumulation): not attempted yet")
    assert wrong.startswith("Exercise 11.2 (int8 matmul, int32 accumulation): not yet ✗ - case 4: "
                            "int8_matmul(a (2, 1500), b (3, 1500)): first mismatch at index (0, 0)")


def test_int8_matmul_check_wants_int32(capsys):
    ch11.check_int8_matmul(lambda a, b: a.long() @ b.long().t())
    (line,) = outputs(capsys)
    assert line.endswith("case 1: the accumulator: expected a torch.int32 tensor, got torch.int64")


# --- 11.3 outlier columns ------------------------------------------------------------------------------


def outlier_columns(x, threshold):
    return (x.abs() >= threshold).any(dim=0).nonzero().view(-1)


def outlier_columns_strict(x, threshold):
    return (x.abs() > threshold).any(dim=0).nonzero().view(-1)  # misses a value exactly at the threshold


def test_outlier_columns_check(capsys):
    passed, stubbed, wrong = run_three(ch11.check_outlier_columns, outlier_columns, outlier_columns_strict, capsys)
    assert passed == "Exercise 11.3 (outlier columns): passed ✓"
    assert stubbed.startswith("Exercise 11.3 (outlier columns): not attempted yet")
    assert wrong.startswith("Exercise 11.3 (outlier columns): not yet ✗ - case 2: outlier columns of a (3, 9) x, "
                            "threshold=6.0: expected shape (2,), got shape (0,)")


# --- 11.4 zero-point per tensor ------------------------------------------------------------------------


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
    assert passed == "Exercise 11.4 (zero-point per tensor): passed ✓"
    assert stubbed.startswith("Exercise 11.4 (zero-point per tensor): not attempted yet")
    assert wrong.startswith("Exercise 11.4 (zero-point per tensor): not yet ✗ - case 2: scale of x of shape (3, 7)")


def test_a_crashing_answer_is_reported(capsys):
    ch11.check_outlier_columns(lambda x, threshold: x.nonexistent)
    (line,) = outputs(capsys)
    assert "case 1: your code raised AttributeError" in line
