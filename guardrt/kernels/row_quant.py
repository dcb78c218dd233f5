"""Per-row (per-token) activation quantization as one Triton kernel, bit for bit the references
(`fp8_linear.quantize_rows`, `int8_dynamic.quantize_rows_int8`); dispatched and checked at load
by `activation_quant.py`.

fp8 `_scaled_mm` and int8 `_int_mm` steps quantize their activations on the fly. In plain
PyTorch that is ~8 kernels through fp32 temporaries (cast, abs, amax, two divisions, where,
clamp, cast): ~39 bytes of traffic an element. For the vision tower's 6,432-row steps that is
~0.8 ms a layer, ~30 ms an image verdict on the H100 (more than fp8 saves on the matmuls), and
for a text step ~1,800 launches. Here one program per row reads the row twice (its max, then
the quantized values; the second read mostly from L2) and writes the 8-bit row and its scale:
~5 bytes an element, one launch.

Exactness: the scale is max|x| times fp32(1/qmax), as the references compute it (a product:
torch's CUDA division by a Python scalar is one, its CPU division is not); the division of each
value by its scale is IEEE round-to-nearest (`div_rn`; Triton's `/` on the GPU is an
approximation of ≤ 2 ulps), as torch's tensor division is; max and |·| are exact in any order;
and the rounding to the 8-bit grid is done in fp32 arithmetic that is exact (scaling by powers
of two, and the 1.5·2²³ round-half-to-even trick). int8 then casts an integer; e4m3 bytes
are assembled from the rounded value's bits, so no fp8 conversion instruction is involved
(Triton's interpreter, where the tests run, neither rounds e4m3 to nearest-even nor keeps NaN).
A row holding a NaN gets scale 1 and keeps its NaNs, as the reference's `where(scale > 0, …)`
gives; infinities divide as in the reference.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from guardrt.export.quantize import QMAX_BY_KIND, STORAGE_BY_KIND, QuantKind
from guardrt.kernels.timer import on_device

triton: Any = importlib.import_module("triton")
tl: Any = importlib.import_module("triton.language")

_BLOCK = 1024  # columns a program reads at once
# Below this many rows (programs) most of the H100's 132 SMs idle: each program gets more warps
# (a decode step's one row of 14,336 is otherwise 112 values a thread on one SM).
_FEW_ROWS = 128
# 1.5·2²³: (y + c) − c rounds |y| < 2²² to an integer, ties to even (a constexpr: compiled
# kernels read only constexpr globals)
_HALF_EVEN: Any = tl.constexpr(12582912.0)


@triton.jit
def _e4m3_bits(y):  # type: ignore[no-untyped-def]
    """The e4m3fn byte (as int32) of y (|y| ≤ 448 or NaN) rounded to the nearest e4m3 value, ties
    to even, by exact fp32 arithmetic: the grid step is 2^(e − 3) for |y| in [2^e, 2^(e+1)),
    e ≥ −6, and 2⁻⁹ below 2⁻⁶ (subnormals); no conversion instruction is involved."""
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80
    magnitude = tl.abs(y)
    exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # fp32 subnormals: −127
    step = tl.maximum(exponent, -6) - 3  # log2 of the grid step
    up = ((127 - step) << 23).to(tl.float32, bitcast=True)  # 2^−step
    down = ((127 + step) << 23).to(tl.float32, bitcast=True)  # 2^step
    steps = (magnitude * up + _HALF_EVEN) - _HALF_EVEN  # exact: |y|·2^−step < 16
    rounded = (steps * down).to(tl.int32, bitcast=True)  # on the grid, ≤ 448
    biased = (rounded >> 23) & 0xFF
    normal = ((biased - 120) << 3) | ((rounded >> 20) & 0x7)  # e4m3 exponent bias 7, 3 bits
    tiny = (steps * down * 512.0).to(tl.int32)  # ≤ 2⁻⁶: k·2⁻⁹ is byte k (k = 8 is 2⁻⁶ itself)
    byte = tl.where(biased <= 121, tiny, normal)
    return tl.where(magnitude != magnitude, 0x7F, byte) | sign  # NaN: 0x7F (0xFF with sign)


# The row stride is specialised (divisible by 16 or not): rows known to be 16-byte aligned load
# 8 bf16 values an instruction; generic ones load one at a time (~8× the load instructions).
@triton.jit  # type: ignore[untyped-decorator]
def _quantize_rows_kernel(  # type: ignore[no-untyped-def]
    x_ptr, q_ptr, s_ptr, stride,
    width: tl.constexpr,  # one compile per layer width (a model has a few); plain loop bounds
    qmax: tl.constexpr, inverse: tl.constexpr, fp8: tl.constexpr, block: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    source = x_ptr + row * stride
    largest = tl.zeros((block,), dtype=tl.float32)
    nans = tl.zeros((block,), dtype=tl.int32)
    for start in range(0, width, block):
        cols = start + tl.arange(0, block)
        v = tl.load(source + cols, mask=cols < width, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.abs(v))
        nans = tl.maximum(nans, (v != v).to(tl.int32))
    scale = tl.max(largest, axis=0) * inverse  # · fp32(1/qmax), as the references compute it
    # The reference's amax of a NaN row is NaN, and `where(NaN > 0, …, 1)` makes its scale 1.
    scale = tl.where((scale > 0) & (tl.max(nans, axis=0) == 0), scale, 1.0)
    tl.store(s_ptr + row, scale)
    for start in range(0, width, block):
        cols = start + tl.arange(0, block)
        mask = cols < width
        v = tl.load(source + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.math.div_rn(v, scale)
        y = tl.where(y > qmax, qmax, tl.where(y < -qmax, -qmax, y))  # NaN stays NaN
        if fp8:  # noqa: SIM108 (a compile-time branch: one of the two is compiled)
            # q_ptr is the e4m3 output viewed as bytes
            out = _e4m3_bits(y).to(tl.uint8)
        else:
            out = ((y + _HALF_EVEN) - _HALF_EVEN).to(tl.int8)  # torch.round: half to even
        tl.store(q_ptr + row * width + cols, out, mask=mask)


def quantize_rows(x: torch.Tensor, kind: QuantKind) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) bf16/fp16/fp32 with unit stride along K → (xq (M, K) contiguous e4m3 or int8,
    scales (M, 1) fp32), x ≈ scales · xq, equal to the reference of `kind`."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"quantize_rows takes (M, K) with unit stride along K: {x.stride()}")
    rows, width = x.shape
    xq = torch.empty((rows, width), dtype=STORAGE_BY_KIND[kind], device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows and width:
        with on_device(x.device):  # Triton launches on the current device, not the input's
            _quantize_rows_kernel[(rows,)](
                x, xq.view(torch.uint8) if kind == "fp8" else xq, scales, x.stride(0),
                width=width, qmax=QMAX_BY_KIND[kind], inverse=1.0 / QMAX_BY_KIND[kind],
                fp8=kind == "fp8",
                block=_BLOCK, num_warps=8 if rows < _FEW_ROWS else 4,
            )  # fmt: skip
    return xq, scales
