"""Which implementation a quantized linear runs: a fast GPU path or the reference forward.

`QuantizedLinear.forward` (guardrt/export/quantize.py) asks `select_path` and runs the answer;
"reference" is its own dequantize-then-`F.linear`, the only path a tracer ever sees:

  int8 weights, per-channel scales, bf16/fp16 input, CUDA (sm ≥ 8.0), triton importable,
    M ≤ the layer's `triton_rows` (INT8_TRITON_MAX_ROWS until `int8_rows.tune` measures it
    on the GPU at load)                                            → "int8_triton" (int8_linear.py)
  the same with quantized activations allowed ("weight+activation"), more rows, CUDA
    (sm ≥ 7.5), K and N multiples of 8               → "int8_int_mm" (int8_dynamic.py)
  any other int8 step with per-channel scales, bf16/fp16 input, CUDA
    (more rows than the Triton kernel takes, or no Triton)          → "int8_cast_mm" (int8_cast.py)
  fp8 e4m3 weights, per-channel scales, bf16/fp16 input, CUDA sm ≥ 8.9,
    K and N multiples of 16, row-major weight                      → "fp8_scaled_mm" (fp8_linear.py)
  anything else: per-group scales, fp32 input, CPU, ROCm, no rows,
    or tracing (torch.jit.trace, torch.export / the dynamo ONNX exporter, torch.compile)
                                                                   → "reference"

fp32 inputs stay on the reference: Triton's `tl.dot` on fp32 defaults to TF32 on the GPU, which the
reference (a plain fp32 matmul) does not, and `_scaled_mm` takes no bias with an fp32 output.
`choose_path` is the decision on tensor metadata with the device facts passed in (the tests call it
with CPU tensors); `select_path` supplies those facts; `run_fast_path` runs the chosen kernel.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Literal

import torch

from guardrt.kernels import fp8_linear as fp8
from guardrt.kernels import int8_cast, int8_dynamic
from guardrt.kernels.device import (
    Capability,
    cuda_capability,
    recording,
    triton_available,
    triton_runs,
)

LinearPath = Literal["reference", "int8_triton", "int8_int_mm", "int8_cast_mm", "fp8_scaled_mm"]

# Rows (tokens) up to which the int8 weight-only kernel runs instead of cast-then-cuBLAS
# (`int8_cast.py`). A decode step (a few rows) reads every weight once and little else, so int8
# weights halve its cost; a prefill (hundreds to thousands of rows) is compute-bound, where
# cuBLAS wins and the cast is amortised. 64 is the default before measurement: on a GPU the
# engine times both paths per layer shape at load and sets each layer's own limit
# (`guardrt/kernels/int8_rows.py`).
INT8_TRITON_MAX_ROWS = 64
FP8_MIN_CAPABILITY: Capability = (8, 9)  # fp8 tensor cores (Ada, Hopper and later)
INT_MM_MIN_CAPABILITY: Capability = (7, 5)  # int8 tensor cores through cuBLASLt (Turing on)
FAST_DTYPES = (torch.bfloat16, torch.float16)


def choose_path(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    capability: Capability | None,
    has_triton: bool,
    activations: bool = False,
    triton_rows: int = INT8_TRITON_MAX_ROWS,
) -> LinearPath:
    """The path for x (..., K) through qweight (N, K) with scales (N, groups), on a CUDA device
    of `capability` (None: not a CUDA device); `activations`: int8 may quantize the activations
    too (the layer's "weight+activation" compute); `triton_rows`: the most rows the int8
    kernel takes (0: none). Reads shapes and dtypes only."""
    n, k = qweight.shape
    rows = x.numel() // k if k else 0  # M: the rows of x flattened to (M, K)
    if capability is None or rows == 0 or x.dtype not in FAST_DTYPES:
        return "reference"
    if scales.numel() != n:  # per-group scales: the kernels take one scale per output channel
        return "reference"
    if qweight.dtype == torch.int8:
        return _int8_path(qweight, rows, capability, has_triton, activations, triton_rows)
    if qweight.dtype == torch.float8_e4m3fn:
        takes = fp8.scaled_mm_takes(n, k) and qweight.is_contiguous()  # .t() must be column-major
        return "fp8_scaled_mm" if capability >= FP8_MIN_CAPABILITY and takes else "reference"
    return "reference"


def precision_warning(kind: str | None, capability: Capability | None) -> str | None:
    """What a load of `kind` weights (a quantization or precision name: "int8", "fp8", "bf16",
    ...; or None) on a CUDA device of `capability` (None: not CUDA) should warn of: fp8 weights
    where the GPU has no fp8 tensor cores take the reference path, a dequantization of every
    weight on every step, slower than bf16; int8's Triton kernel and cast run from sm 8.0."""
    if kind != "fp8" or capability is None or capability >= FP8_MIN_CAPABILITY:
        return None
    major, minor = capability
    return (
        f"fp8 weights on a GPU of compute capability {major}.{minor}: fp8 tensor cores need "
        f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or later, so every step dequantizes "
        "each weight before its matmul, slower than bf16; --quantize int8 is this GPU's "
        "8-bit precision (the same memory)"
    )


def _int8_path(
    qweight: torch.Tensor,
    rows: int,
    capability: Capability,
    has_triton: bool,
    activations: bool,
    triton_rows: int,
) -> LinearPath:
    n, k = qweight.shape
    if rows <= triton_rows and triton_runs(capability, has_triton):
        return "int8_triton"
    # Steps the weight-only kernel declined; a decode step (≤ the default limit) stays weight-
    # only (cast, then cuBLAS): quantizing a few rows' activations buys nothing there.
    large = rows > INT8_TRITON_MAX_ROWS
    takes = int8_dynamic.int_mm_takes(rows, n, k) and qweight.is_contiguous()
    if activations and large and takes and capability >= INT_MM_MIN_CAPABILITY:
        return "int8_int_mm"
    return "int8_cast_mm"  # the weight dequantized in one pass, then cuBLAS (bf16 or fp16)


def select_path(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    activations: bool = False,
    triton_rows: int = INT8_TRITON_MAX_ROWS,
) -> LinearPath:
    """`choose_path` on this process's facts; "reference" whenever a tracer is recording, so
    exported graphs (ONNX, torch.export) keep the `guardrt::dequantize` op their translation
    table maps to DequantizeLinear. Checked first, before any look at the device."""
    if recording():
        return "reference"
    capability = cuda_capability(x.device)
    return choose_path(x, qweight, scales, capability, triton_available(), activations, triton_rows)


def run_fast_path(
    path: LinearPath,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: Mapping[int, tuple[int, int]] | None = None,
) -> torch.Tensor:
    """x (..., K), qweight (N, K), scales (N, 1) fp32, bias (N,) in x's dtype or None → (..., N)
    in x's dtype, through the kernel `path` names (never "reference": the caller owns that).
    `blocks`: the int8 kernel's measured block shapes for this layer (`int8_linear`)."""
    if path == "int8_triton":
        result: torch.Tensor = _int8_module().int8_linear(x, qweight, scales, bias, blocks)
        return result
    if path == "fp8_scaled_mm":
        return fp8.fp8_linear(x, qweight, scales, bias)
    if path == "int8_int_mm":
        return int8_dynamic.int8_dynamic_linear(x, qweight, scales, bias)
    if path == "int8_cast_mm":
        return int8_cast.int8_cast_linear(x, qweight, scales, bias)
    raise ValueError(
        f"{path!r} is not a fast path (int8_triton, int8_int_mm, int8_cast_mm, fp8_scaled_mm)"
    )


@functools.cache
def _int8_module() -> ModuleType:
    """int8_linear.py, imported on first use: it imports triton (a second's start-up, absent on
    some machines), and quantize.py, which imports this module, runs everywhere."""
    return importlib.import_module("guardrt.kernels.int8_linear")
