"""Compile every Triton kernel of guardrt for Hopper (sm_90) on this machine, without a GPU.

    TRITON_INTERPRET=0 python -m tests.compile_kernels   (prints one JSON object)

Triton compiles ahead of time for a named target: the kernel's source → TTIR → TTGIR → LLVM → PTX
→ cubin (the ptxas bundled with the triton wheel), exactly as the first launch on an H100 would,
with the arguments specialised as the wrappers launch them (pointers and strides divisible by
16, unit strides as the constant 1, the sizes a kernel does not specialise left generic). What
this catches before the one GPU run: code the interpreter accepts but the compiler rejects, a
block shape that needs more shared memory than the H100 has, FMA contraction where a kernel
promises none, an approximate division where a kernel promises IEEE ones.
`tests/test_kernel_compile.py` runs it in a subprocess (the tests' own process runs Triton's
interpreter).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from typing import Any

HOPPER_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on an H100


def _compile(fn: Any, types: dict[str, str], constants: dict[str, Any], divisible: set[str],
             options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    triton: Any = importlib.import_module("triton")  # untyped: imported by name
    target = importlib.import_module("triton.backends.compiler").GPUTarget("cuda", 90, 32)
    source = importlib.import_module("triton.compiler").ASTSource

    names = [p.name for p in fn.params]
    signature = {n: ("constexpr" if n in constants else types[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    started = time.perf_counter()
    kernel = triton.compile(source(fn, signature, constants, attrs), target=target, options=options)
    ptx = kernel.asm["ptx"]
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "shared_bytes": int(kernel.metadata.shared),
        "fma": len(re.findall(r"\bfma\.", ptx)),
        "approximate_divisions": len(re.findall(r"\bdiv\.(?:full|approx)\.", ptx)),
        "cubin_bytes": len(kernel.asm["cubin"]),
    }


def _cases() -> dict[str, tuple[Any, dict[str, str], dict[str, Any], set[str], dict[str, Any]]]:
    from guardrt.export.quantize import QMAX_BY_KIND, QuantKind  # noqa: PLC0415
    from guardrt.kernels import (  # noqa: PLC0415
        int8_linear,
        norm_rope,
        rescale_kernel,
        row_quant,
        silu_mul,
    )

    cases = {}
    for dt in ("bf16", "fp16", "fp32"):
        ptr = f"*{dt}"
        norm = dict.fromkeys(("x_ptr", "r_ptr", "w_ptr", "y_ptr", "s_ptr"), ptr) | {"eps": "fp32"}
        strides = ("sx0", "sx1", "sx2", "sr0", "sr1", "sr2", "sy0", "sy1", "sy2")
        norm |= dict.fromkeys(("rows", "n1", "n2", *strides), "i32")
        divisible = {"x_ptr", "r_ptr", "w_ptr", "y_ptr", "s_ptr", *strides}
        for d, rows, warps in ((4096, 1, 8), (128, 32, 4)):
            for residual in (False, True):  # the plain norm; the residual add and the norm
                shape = {"d": d, "block_d": d, "block_r": rows, "residual": residual}
                cases[f"rms_norm {dt} d={d} residual={residual}"] = (
                    norm_rope._rms_norm_kernel, norm, shape, divisible, {"num_warps": warps},
                )  # fmt: skip
        rope = dict.fromkeys(("x_ptr", "cos_ptr", "sin_ptr", "y_ptr"), ptr)
        names = ("sxb", "sxh", "sxs", "syb", "syh", "sys", "scb", "scs", "ssb", "sss")
        rope |= dict.fromkeys(("seq", "heads", *names), "i32")
        cases[f"rope {dt}"] = (
            norm_rope._rope_kernel, rope, {"half": 64, "block_half": 64, "block_h": 16},
            {"x_ptr", "cos_ptr", "sin_ptr", "y_ptr", *names}, {"enable_fp_fusion": False},
        )  # fmt: skip
        silu = {"g_ptr": ptr, "u_ptr": ptr, "y_ptr": ptr}
        silu |= dict.fromkeys(("n1", "width", "sg0", "sg1", "su0", "su1", "sy0", "sy1"), "i32")
        cases[f"silu_mul {dt}"] = (
            silu_mul._silu_mul_kernel, silu, {"block": 1024},
            {"g_ptr", "u_ptr", "y_ptr", "width", "sg0", "sg1", "su0", "su1", "sy0", "sy1"},
            {"num_warps": 4},
        )  # fmt: skip
        storages: dict[QuantKind, str] = {"fp8": "*u8", "int8": "*i8"}  # e4m3 as its bytes
        for kind, storage in storages.items():
            quant = {"x_ptr": ptr, "q_ptr": storage, "s_ptr": "*fp32", "stride": "i32"}
            for width in (1280, 14336):
                qmax = QMAX_BY_KIND[kind]
                constants: dict[str, Any] = {"width": width, "qmax": qmax, "inverse": 1 / qmax,
                                             "fp8": kind == "fp8", "block": 1024}  # fmt: skip
                for aligned, warps in ((True, 8), (False, 4)):  # rows 16-aligned or not
                    pointers = {"x_ptr", "q_ptr", "s_ptr", "stride"} if aligned else {"s_ptr"}
                    cases[f"quantize_rows {kind} {dt} width={width} aligned={aligned}"] = (
                        row_quant._quantize_rows_kernel, quant, constants, pointers,
                        {"num_warps": warps},
                    )  # fmt: skip
        # The int8 product's epilogue: int32 in, bf16 written as its bits (u16), fp16 or fp32.
        epilogue = {"acc_ptr": "*i32", "sx_ptr": "*fp32", "sw_ptr": "*fp32", "b_ptr": ptr,
                    "y_ptr": "*u16" if dt == "bf16" else ptr}  # fmt: skip
        epilogue |= dict.fromkeys(("rows", "cols", "stride_a", "stride_y"), "i32")
        for bias in (False, True):
            cases[f"rescale {dt} bias={bias}"] = (
                rescale_kernel._rescale_kernel, epilogue,
                {"has_sx": True, "has_bias": bias, "bf16": dt == "bf16", "block_m": 32,
                 "block_n": 128},
                {"acc_ptr", "sx_ptr", "sw_ptr", "b_ptr", "y_ptr"},
                {"num_warps": 4, "enable_fp_fusion": False},
            )  # fmt: skip
    for dt in ("bf16", "fp16"):  # the dtypes the dispatch sends to the int8 kernel
        for bm in (16, 32, 64):
            for bn, bk in int8_linear.BLOCKS:
                types = {"x_ptr": f"*{dt}", "q_ptr": "*i8", "s_ptr": "*fp32",
                         "b_ptr": f"*{dt}", "y_ptr": f"*{dt}", "m": "i32", "n": "i32",
                         "stride_xm": "i32", "stride_qn": "i32", "stride_ym": "i32"}  # fmt: skip
                constants = {"stride_xk": 1, "stride_qk": 1, "stride_yn": 1, "k": 4096,
                             "has_bias": dt == "fp16", "bm": bm, "bn": bn, "bk": bk}  # fmt: skip
                divisible = {"x_ptr", "q_ptr", "s_ptr", "b_ptr", "y_ptr", "n", "stride_xm",
                             "stride_qn", "stride_ym"}  # fmt: skip
                cases[f"int8_linear {dt} bm={bm} {bn}x{bk}"] = (
                    int8_linear._int8_linear_kernel, types, constants, divisible, {},
                )  # fmt: skip
    return cases


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter compiles nothing")
    results: dict[str, Any] = {}
    for name, (fn, types, constants, divisible, options) in _cases().items():
        try:
            results[name] = _compile(fn, types, constants, divisible, options)
        except Exception as exc:  # noqa: BLE001 (reported per kernel)
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
