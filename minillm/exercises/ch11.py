"""Checks for chapter 11's exercises, each judged by a reference computed inside the check: bitsandbytes'
`Linear8bitLt` judges the LLM.int8() forward (the build exercise, 11.1), an exact int64 matmul the int8 matmul,
bitsandbytes' `int8_vectorwise_quant` the outlier columns, and torch's fake-quantize ops and observers absmax
and zero-point int8.

Why equal to the bit on every CPU: the int8 matmul is exact on both sides (int32 here; bitsandbytes uses
`torch._int_mm` on AVX512 CPUs and an fp32 matmul elsewhere, which is exact too while K * 127**2 <= 2**24, i.e.
K <= 1040, since every partial sum is then an integer fp32 holds, in any summation order); everything else is
the same torch ops on the same operands in the same order (elementwise fp32 arithmetic, one cast, one `addmm`).
All shapes here keep K <= 1040.
"""

import copy

import torch

from minillm.exercises import Mismatch, check, exercise, expect_equal, expect_tensor, verdict

EXACT_FP32_INTEGER_SUMS = 2**24  # every integer up to this magnitude is an fp32 value


def _expect_dtype(got, dtype, what: str) -> None:
    if not isinstance(got, torch.Tensor) or got.dtype != dtype:
        found = got.dtype if isinstance(got, torch.Tensor) else type(got).__name__
        raise Mismatch(f"{what}: expected a {dtype} tensor, got {found}")


def _pair_or_triple(got, n: int, names: str):
    if not isinstance(got, tuple) or len(got) != n:
        raise Mismatch(f"expected a tuple ({names}), got {type(got).__name__}")
    return got


def _bnb_layer(linear: torch.nn.Linear, threshold: float):
    """bitsandbytes' LLM.int8() layer holding `linear`'s weights, in eval mode; moving it to the CPU quantizes."""
    import bitsandbytes as bnb  # imported here: bitsandbytes is slow to import and logs on import

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()


def _expect_bitwise(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Raise `Mismatch` at the first element that differs in any bit (printed with 9 digits, enough for fp32)."""
    got = expect_tensor(got, expected, what)
    differs = got.float() != expected.float()  # widening fp16/bf16 to fp32 is exact
    if differs.any():
        index = tuple(int(i) for i in differs.nonzero()[0])
        raise Mismatch(f"{what}: first mismatch at index {index}: bitsandbytes gives "
                       f"{expected[index].item():.9g}, you give {got[index].item():.9g}")


@exercise("11.1", "LLM.int8() forward", kind="build", component="llm_int8",
          replaces="minillm.quant.int8:llm_int8_linear",
          hides=("int8.llm_int8_linear", "Int8Linear.forward", "int8_vectorwise_quant", "int8_linear_matmul",
                 "int8_mm_dequant", "int8_vectorwise_dequant"))
def check_llm_int8_linear(llm_int8_linear) -> None:
    """Exercise 11.1 (build): `llm_int8_linear(x, weight_codes, weight_absmax, bias, threshold)` -> (N, out) in
    x's dtype for a 2-D x (N, in), judged bit for bit by `bitsandbytes.nn.Linear8bitLt` in eval mode holding the
    same weights (the codes and absmax come from bitsandbytes' own `int8_vectorwise_quant` of the fp16 weight)."""
    import bitsandbytes.functional as bnb_F

    g = torch.Generator().manual_seed(1101)

    def case(n, k, out, dtype, threshold, planted=(), bias=True):
        linear = torch.nn.Linear(k, out, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out, k, generator=g) / k**0.5)
            if bias:
                linear.bias.copy_(torch.randn(out, generator=g))
        x = torch.randn(n, k, generator=g)
        for col, value in planted:  # a big value in column col, in row col % n: an outlier column
            x[col % n, col] = value
        x = x.to(dtype)

        def run():
            with torch.no_grad():
                expected = _bnb_layer(linear, threshold)(x.clone())  # (N, out)
                codes, absmax, _ = bnb_F.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
                b = None if linear.bias is None else linear.bias.detach().to(dtype)
                got = llm_int8_linear(x.clone(), codes, absmax, b, threshold)
            what = f"a ({n}, {k}) {str(dtype)[6:]} x, threshold {threshold}" + ("" if bias else ", no bias")
            _expect_bitwise(got, expected, f"output for {what}")
        return run

    outliers = [(3, 9.0), (17, -14.0), (40, 6.0)]  # 6.0 itself is an outlier (>=)
    cases = [case(4, 32, 16, torch.float32, 0.0), case(5, 64, 24, torch.float32, 6.0, outliers),
             case(6, 64, 8, torch.float16, 6.0, outliers, bias=False), case(3, 48, 20, torch.bfloat16, 6.0, outliers),
             case(7, 96, 12, torch.float32, 2.5, [(50, 3.0)]), case(1, 64, 10, torch.float16, 6.0, outliers[:2])]
    check("11.1", cases,
          hint="equal to the bit means bitsandbytes' arithmetic in bitsandbytes' order: follow the spec's steps "
               "one by one, in the dtypes it names.",
          more="if only the fp32 and bf16 cases fail, look at which steps work on x cast to fp16 and which on x "
               "in its own dtype; if every value is off by about 2e-5 relative, look at the constant that undoes "
               "the two 127s; if only the outlier cases fail, by a unit in the last place, look at how the "
               "weight's outlier columns are dequantized (order of the products, then one cast) and how their "
               "product is added (one call that multiplies and adds, in x's dtype).")


def _bnb_twin(model: torch.nn.Module, threshold: float) -> torch.nn.Module:
    """`model` with every nn.Linear but lm_head replaced, in place, by bitsandbytes' LLM.int8() layer."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                setattr(parent, name, _bnb_layer(child, threshold))
    return model


def _record_outputs(model: torch.nn.Module, kind: type, store: dict) -> None:
    """Keep each `kind` layer's output under its name, in the order the layers run."""
    for name, module in model.named_modules():
        if isinstance(module, kind):
            module.register_forward_hook(lambda m, inputs, output, name=name: store.__setitem__(name, output))


def end_to_end_llm_int8(thresholds=(0.0, 6.0)) -> bool:
    """The shipped model with every linear layer but lm_head in LLM.int8(), twice: minillm's `Int8Linear`
    (running `llm_int8_linear`, the learner's inside `use(llm_int8=...)`) and bitsandbytes' `Linear8bitLt`.
    Eval mode, one 128-token story; the logits must be equal to the bit."""
    import bitsandbytes as bnb

    from minillm.data import corpus
    from minillm.pretrained import load_pretrained
    from minillm.quant import Int8Linear, quantize_model

    model, tokenizer = load_pretrained()
    ids = torch.tensor([tokenizer.encode(corpus()[:800])[:128]])  # (1, 128)
    widest = max(m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and not n.endswith("lm_head"))
    if widest * 127**2 > EXACT_FP32_INTEGER_SUMS:
        raise ValueError(f"a layer with {widest} inputs: bitsandbytes' fp32 fallback could round, no bitwise verdict")
    claim = (f"shipped model, every linear but lm_head in LLM.int8() with your forward: logits equal "
             f"bitsandbytes Linear8bitLt's bit for bit (thresholds {', '.join(map(str, thresholds))})")
    for threshold in thresholds:
        ours = quantize_model(copy.deepcopy(model), "int8", threshold=threshold).eval()
        theirs = _bnb_twin(copy.deepcopy(model), threshold)
        our_outputs, their_outputs = {}, {}
        _record_outputs(ours, Int8Linear, our_outputs)
        _record_outputs(theirs, bnb.nn.Linear8bitLt, their_outputs)
        with torch.no_grad():
            expected = theirs(ids)
            try:
                got = ours(ids)
            except NotImplementedError:
                raise  # the stub: use() prints "plug-in skipped"
            except Exception as error:
                return verdict(False, claim, f"threshold {threshold}: your forward raised {type(error).__name__}: "
                                             f"{error}")
        if not torch.equal(got, expected):
            first = next((name for name in their_outputs if not (
                isinstance(our_outputs.get(name), torch.Tensor) and our_outputs[name].shape == their_outputs[name].shape
                and torch.equal(our_outputs[name], their_outputs[name]))), "lm_head")
            return verdict(False, claim, f"threshold {threshold}: first layer whose output differs is {first}; "
                                         f"max |logit difference| {(got - expected).abs().max().item():.3g}")
    print(f"widest layer input: {widest}; {widest} * 127**2 = {widest * 127**2:,} <= 2**24, so bitsandbytes' "
          "int8 matmul is exact on every CPU (AVX512 or not) and a bitwise verdict is portable")
    return verdict(True, claim)


@exercise("11.2", "absmax per row")
def check_absmax_quantize_rows(absmax_quantize_rows) -> None:
    """Exercise 11.2: `absmax_quantize_rows(x)` -> (int8 codes, fp32 scale of shape (rows, 1)) for a 2-D x,
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
    check("11.2", cases,
          hint="one scale per row: the row's largest magnitude maps to code 127, and the scale must broadcast "
               "against x.",
          more="reduce |x| over the columns keeping the reduced dimension, divide by 127; the codes are x divided "
               "by that step, rounded to the nearest integer (ties to even, as torch rounds) and stored as int8.")


@exercise("11.3", "int8 matmul, int32 accumulation")
def check_int8_matmul(int8_matmul) -> None:
    """Exercise 11.3: `int8_matmul(a, b)` -> a @ b.T as int32 for int8 a (M, K) and b (N, K), judged by an
    exact int64 matmul in torch."""
    g = torch.Generator().manual_seed(112)

    def case(m, k, n, full=False):
        # full: every product is 127 * 127. int16 overflows after 3 terms; with K = 1041 the exact sum
        # 1041 * 127**2 = 16 790 289 is odd and above 2**24, where fp32 holds only even integers: no fp32
        # accumulation, in any order, can return it.
        if full:
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

    cases = [case(3, 4, 2), case(5, 33, 7), case(1, 1, 1), case(2, 1041, 3, full=True)]
    check("11.3", cases,
          hint="the products of int8 values do not fit in int8, and large sums of them do not fit in fp32's "
               "24-bit mantissa: accumulate in a type that holds every partial sum exactly.",
          more="widen both operands to an integer type of at least 32 bits before the matmul (not after), then "
               "make sure the result you return is torch.int32.")


@exercise("11.4", "outlier columns")
def check_outlier_columns(outlier_columns) -> None:
    """Exercise 11.4: `outlier_columns(x, threshold)` -> sorted int64 indices of the columns of a 2-D x that
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
    check("11.4", cases,
          hint="a column is an outlier column when any of its values has a magnitude at or above the threshold; "
               "return the indices of those columns, not a mask.",
          more="compare |x| with the threshold (a value exactly at the threshold counts), reduce the boolean "
               "mask over the rows, and turn the surviving column positions into a 1-D int64 tensor.")


@exercise("11.5", "zero-point per tensor")
def check_zeropoint_quantize_tensor(zeropoint_quantize_tensor) -> None:
    """Exercise 11.5: `zeropoint_quantize_tensor(x)` -> (int8 codes, fp32 scale, int32 zero_point), one scale
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
    check("11.5", cases,
          hint="the range must contain 0 so that 0.0 gets an exact code; 255 steps span the range, and the zero "
               "point is the code that the range's low end lands on, shifted so that it maps to -128.",
          more="widen [min, max] to include 0 first, then derive the step from the widened range; the zero point "
               "is an integer (round it); add it to the rounded x / step and clamp into int8's range.")
