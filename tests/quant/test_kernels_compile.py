"""Every kernel of minillm.quant.kernels compiles for an H100/H200 (sm_90), with no GPU present.

Chapter 13's tests run the kernels in Triton's interpreter, which executes the Python source with numpy and
never builds GPU code: a kernel that breaks a GPU-only rule (an int8 `tl.dot` with K below 32, which the
interpreter happily runs; a `tl.dot` tile below 16; a type the hardware lacks) would pass them. So this file asks Triton's real compiler for sm_90 machine
code: `triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))` runs the
whole pipeline (Triton IR, GPU IR, LLVM IR, PTX, and `ptxas`, which ships inside the triton wheel, to a
cubin) without touching a driver. It is `JITFunction.run`'s compile step without the launch.

The kernels must be *defined* in compiled mode for this (`TRITON_INTERPRET` is read when `@triton.jit`
runs), so the compilation happens in a subprocess started with `TRITON_INTERPRET=0`; that also checks that
an explicit setting wins over the package's default. Run this file directly to see the PTX sizes:
`TRITON_INTERPRET=0 python tests/quant/test_kernels_compile.py`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TARGET = ("cuda", 90, 32)  # backend, compute capability 9.0 (Hopper), warp size


def kernel_cases():
    """(name, kernel, signature, constexprs, what the PTX must contain) for each variant the launchers start.

    Signatures use Triton's type strings: `*fp16` is a pointer to fp16, `i32` a 32-bit integer argument,
    `constexpr` an argument fixed at compile time (None for the unused double-quantization pointers).
    Block sizes are the launchers' GPU choices, for a large and for the smallest problems.
    """
    from minillm.quant.kernels import dequant, matmul

    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    cvt = {torch.float32: "st.global", torch.float16: "cvt.rn.f16", torch.bfloat16: "cvt.rn.bf16"}  # f16x2 too
    nested_args = {True: ({"nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32"}, {}),
                   False: ({}, {"nested_absmax_ptr": None, "nested_code_ptr": None, "offset_ptr": None})}
    # Every branch once (each dtype, with and without double quantization), not every combination: each
    # compilation takes a second or more.
    variants = [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False), (torch.bfloat16, True)]
    tiles = [matmul.tile_sizes(16, 4096, 4096), matmul.tile_sizes(1, 1, 1), matmul.tile_sizes(256, 4096, 4096)]
    cases = []
    for i, (dtype, nested) in enumerate(variants):
        nested_sig, nested_const = nested_args[nested]
        cases.append((
            f"dequantize_4bit_kernel {dtype} nested={nested}", dequant.dequantize_4bit_kernel,
            {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
             "out_ptr": ptr[dtype], "n": "i32", **nested_sig},
            {**nested_const, "BLOCKSIZE": 64, "NESTED": nested, "NESTED_BLOCKSIZE": 256,
             "BLOCK": dequant.BLOCK_4BIT, "INTERPRET": False},
            cvt[dtype]))  # the GPU's own rounding cast, not the interpreter's integer workaround
        if i == 3:
            continue  # the fused matmul and int8 dequantization need each dtype once
        cases.append((
            f"matmul_4bit_kernel {dtype} nested={nested} tiles={tiles[i]}", matmul.matmul_4bit_kernel,
            {"x_ptr": ptr[dtype], "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
             "code_ptr": "*fp32", "out_ptr": ptr[dtype], "M": "i32", "N": "i32", "K": "i32",
             "stride_xm": "i32", "stride_xk": "i32", "stride_om": "i32", "stride_on": "i32", **nested_sig},
            {**nested_const, "BLOCKSIZE": 64, "NESTED": nested, "NESTED_BLOCKSIZE": 256,
             **dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tiles[i])), "INTERPRET": False},
            "fma.rn.f32" if dtype == torch.float32 else "mma"))  # fp32: exact FMAs (ieee), else tensor cores
        block_r, block_c = dequant.BLOCK_INT8
        cases.append((
            f"dequantize_int8_kernel {dtype}", dequant.dequantize_int8_kernel,
            {"q_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": ptr[dtype], "rows": "i32", "cols": "i32",
             "stride_qr": "i32", "stride_qc": "i32", "stride_or": "i32", "stride_oc": "i32"},
            {"BLOCK_R": block_r, "BLOCK_C": block_c, "INTERPRET": False}, cvt[dtype]))
    cases.append((
        "matmul_int8_kernel", matmul.matmul_int8_kernel,
        {"a_ptr": "*i8", "a_scale_ptr": "*fp32", "b_ptr": "*i8", "b_scale_ptr": "*fp32", "out_ptr": "*fp32",
         "M": "i32", "N": "i32", "K": "i32", **{f"stride_{s}": "i32" for s in ("am", "ak", "bn", "bk", "om", "on")}},
        dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), matmul.tile_sizes(1, 1, 1, min_k=32))),  # the smallest
        ".s32.s8.s8.s32"))  # int8 tensor cores (mma.sync ... .s32.s8.s8.s32): int8 inputs, int32 accumulation
    return cases


def compile_all() -> int:
    """Compile every case for sm_90; print one line each; return the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from minillm.quant import kernels

    print(f"INTERPRETED={kernels.INTERPRETED}")
    assert not kernels.INTERPRETED, "TRITON_INTERPRET=0 must win over the package's default"
    failures = 0
    for name, kernel, signature, constexprs, needle in kernel_cases():
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget(*TARGET),
                                      options={"num_warps": 4, "enable_fp_fusion": False})
            ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
            ok = needle in ptx and ".target sm_90" in ptx and len(cubin) > 0
            print(f"{'ok' if ok else 'FAIL'} {name}: {len(ptx)} chars of PTX, {len(cubin)} bytes of cubin"
                  + ("" if ok else f"; PTX lacks {needle!r}"))
        except Exception as error:  # report every kernel, not just the first failure
            ok = False
            print(f"FAIL {name}: {type(error).__name__}: {str(error)[:2000]}")
        failures += not ok
    return failures


def python(args: list[str], triton_interpret: str | None) -> subprocess.Popen:
    """Start `python *args` from the repository root with TRITON_INTERPRET set to the value (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_interpret is not None:
        env["TRITON_INTERPRET"] = triton_interpret
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def processes():
    """Both subprocesses start at once (importing torch and triton takes seconds); each test waits for its own."""
    started = {"compile": python([__file__], "0"),
               "default": python(["-c", "from minillm.quant import kernels; print(kernels.INTERPRETED)"], None)}
    yield started
    for process in started.values():
        process.kill()
        process.communicate()


def test_every_kernel_compiles_for_sm90(processes):
    stdout, stderr = processes["compile"].communicate(timeout=600)
    assert processes["compile"].returncode == 0, (
        "a kernel failed to compile for sm_90 (the interpreter would not notice); fix the kernel source, "
        f"not the test:\n{stdout}\n{stderr[-3000:]}")
    assert stdout.count("\nok ") == len(stdout.splitlines()) - 1, stdout


def test_package_picks_the_interpreter_without_a_gpu(processes):
    stdout, stderr = processes["default"].communicate(timeout=300)
    assert stdout.strip() == str(not torch.cuda.is_available()), \
        f"INTERPRETED should be True exactly when CUDA is absent and TRITON_INTERPRET unset: {stdout}{stderr}"


if __name__ == "__main__":
    sys.exit(min(compile_all(), 1))
