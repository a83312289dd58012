"""Checks for chapter 11's exercises: torch's fake-quantize ops judge absmax and zero-point int8, an exact
int64 matmul judges the int8 matmul, and bitsandbytes' `int8_vectorwise_quant` judges the outlier columns,
each computed inside the check."""

import torch

from minillm.exercises import Mismatch, check, expect_equal


def _expect_dtype(got, dtype, what: str) -> None:
    if not isinstance(got, torch.Tensor) or got.dtype != dtype:
        found = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"{what}: expected a {dtype} tensor, got {found}")


def _pair_or_triple(got, n: int, names: str):
    if not isinstance(got, tuple) or len(got) != n:
        raise Mismatch(f"expected a tuple ({names}), got {type(got).__name__}")
    return got


def check_absmax_quantize_rows(absmax_quantize_rows) -> None:
    """Exercise 11.1: `absmax_quantize_rows(x)` -> (int8 codes, fp32 scale of shape (rows, 1)) for a 2-D x,
    judged by `torch.fake_quantize_per_channel_affine(x, absmax / 127, 0, axis=0, -127, 127)`."""
    g = torch.Generator().manual_seed(111)

    def case(rows, cols, spread):
        x = torch.randn(rows, cols, generator=g) * spread  # spread: (rows, 1) or a number

        def run():
            scale = x.abs().amax(dim=1) / 127  # (rows,)
            expected = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(rows, dtype=torch.int32),
                                                              0, -127, 127)
            codes, got_scale = _pair_or_triple(absmax_quantize_rows(x.clone()), 2, "codes, scale")
            _expect_dtype(codes, torch.int8, "codes")
            expect_equal(got_scale, scale.view(rows, 1), what=f"scale of a ({rows}, {cols}) x", rtol=1e-6, atol=0)
            expect_equal(codes.float() * got_scale, expected, what=f"codes * scale of a ({rows}, {cols}) x",
                         atol=1e-6, rtol=1e-5)
        return run

    cases = [case(4, 8, 1.0), case(3, 17, torch.tensor([[0.01], [1.0], [100.0]])), case(1, 5, -3.0),
             case(7, 64, torch.linspace(0.1, 5, 7).view(7, 1))]
    check("Exercise 11.1 (absmax per row)", cases,
          hint="scale = x.abs().amax(dim=1, keepdim=True) / 127 (one per row, keepdim so it broadcasts); "
               "codes = torch.round(x / scale).to(torch.int8)")


def check_int8_matmul(int8_matmul) -> None:
    """Exercise 11.2: `int8_matmul(a, b)` -> a @ b.T as int32 for int8 a (M, K) and b (N, K), judged by an
    exact int64 matmul in torch."""
    g = torch.Generator().manual_seed(112)

    def case(m, k, n, full=False):
        if full:  # every product is 127 * 127: int16 overflows after 3 terms, fp32 loses bits past 2**24
            a, b = torch.full((m, k), 127, dtype=torch.int8), torch.full((n, k), 127, dtype=torch.int8)
        else:
            a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
            b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)

        def run():
            expected = a.long() @ b.long().t()  # (M, N), exact
            got = int8_matmul(a.clone(), b.clone())
            _expect_dtype(got, torch.int32, "the accumulator")
            expect_equal(got.long(), expected, what=f"int8_matmul(a {tuple(a.shape)}, b {tuple(b.shape)})",
                         atol=0, rtol=0)
        return run

    cases = [case(3, 4, 2), case(5, 33, 7), case(1, 1, 1), case(2, 1500, 3, full=True)]
    check("Exercise 11.2 (int8 matmul, int32 accumulation)", cases,
          hint="widen before multiplying: a.to(torch.int32) @ b.to(torch.int32).t(); int8 products overflow "
               "int8 at once, and an fp32 matmul rounds once its sums pass 2**24")


def check_outlier_columns(outlier_columns) -> None:
    """Exercise 11.3: `outlier_columns(x, threshold)` -> sorted int64 indices of the columns of a 2-D x that
    hold a value with |value| >= threshold, judged by `bitsandbytes.functional.int8_vectorwise_quant`."""
    import bitsandbytes.functional as bnb_F  # imported here: bitsandbytes is slow to import and logs on import
    g = torch.Generator().manual_seed(113)

    def case(rows, cols, planted, threshold, dtype=torch.float16):
        x = torch.randn(rows, cols, generator=g)
        for col, value in planted:  # (column, value): one big entry in that column, in row col % rows
            x[col % rows, col] = value
        x = x.to(dtype)

        def run():
            _, _, expected = bnb_F.int8_vectorwise_quant(x.clone(), threshold=threshold)
            got = outlier_columns(x.clone(), threshold)
            _expect_dtype(got, torch.int64, "the outlier columns")
            expect_equal(got, expected, what=f"outlier columns of a ({rows}, {cols}) x, threshold={threshold}",
                         atol=0, rtol=0)
        return run

    cases = [case(4, 10, [(2, 9.0), (7, -12.0)], 6.0), case(3, 9, [(0, 6.0), (8, -6.0), (4, 5.99)], 6.0),
             case(5, 6, [], 6.0), case(6, 40, [(5, 3.5), (33, -2.5), (20, 80.0)], 2.5, torch.float32)]
    check("Exercise 11.3 (outlier columns)", cases,
          hint="mask = x.abs() >= threshold (>=, not >); a column is an outlier if any row is: "
               "mask.any(dim=0).nonzero().view(-1)")


def check_zeropoint_quantize_tensor(zeropoint_quantize_tensor) -> None:
    """Exercise 11.4: `zeropoint_quantize_tensor(x)` -> (int8 codes, fp32 scale, int32 zero_point), one scale
    for the whole tensor, judged by torch's `MinMaxObserver(qint8, -128..127)` for the parameters and
    `torch.fake_quantize_per_tensor_affine` for the codes."""
    g = torch.Generator().manual_seed(114)

    def case(shape, shift, stretch):
        x = torch.randn(shape, generator=g) * stretch + shift

        def run():
            observer = torch.ao.quantization.MinMaxObserver(dtype=torch.qint8, quant_min=-128, quant_max=127)
            observer(x)
            scale, zero_point = observer.calculate_qparams()  # (1,), (1,)
            expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)
            codes, got_scale, got_zero = _pair_or_triple(zeropoint_quantize_tensor(x.clone()), 3,
                                                         "codes, scale, zero_point")
            _expect_dtype(codes, torch.int8, "codes")
            what = f"x of shape {tuple(shape)}"
            expect_equal(torch.as_tensor(got_scale).reshape(()), scale[0], what=f"scale of {what}", rtol=1e-6, atol=0)
            expect_equal(torch.as_tensor(got_zero).reshape(()), zero_point[0], what=f"zero_point of {what}",
                         atol=0, rtol=0)
            dequantized = (codes.int() - zero_point[0]) * scale[0]
            expect_equal(dequantized, expected, what=f"(codes - zero_point) * scale of {what}", atol=1e-6, rtol=1e-5)
        return run

    cases = [case((4, 6), 0.0, 1.0), case((3, 7), 5.0, 1.0), case((9,), -4.0, 0.5), case((2, 3, 5), 1.0, 3.0)]
    check("Exercise 11.4 (zero-point per tensor)", cases,
          hint="widen the range to include 0: low = min(x.min(), 0), high = max(x.max(), 0); scale = (high - low) / "
               "255; zero_point = -128 - round(low / scale); codes = clamp(round(x / scale) + zero_point, -128, 127)")
