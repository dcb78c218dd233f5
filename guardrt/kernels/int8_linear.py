"""int8 weight-only linear in Triton: y = x · (s ⊙ q)ᵀ (+ b), reading the int8 weights directly.

A decode step reads every weight once and does little else, so its floor is the weight bytes
over the memory bandwidth: int8 weights (1 byte) instead of bf16 (2 bytes) halve it. The
reference this kernel must equal is `guardrt.export.quantize.QuantizedLinear`'s reference forward
(dequantize to the activations' dtype, then matmul); `tests/test_kernels.py` checks it under
Triton's CPU interpreter (TRITON_INTERPRET=1). Per-output-channel scales only (the export's
scheme): the scale factors out of the K reduction and is applied once to the accumulator.

`QuantizedLinear` runs it for bf16/fp16 inputs of at most `INT8_TRITON_MAX_ROWS` rows on CUDA
(`guardrt/kernels/dispatch.py`). It has not run on a GPU yet: `benchmarks/kernels.py` checks it
there and measures where it stops beating the reference. The interpreter has no bf16, so bf16 is
checked only on the GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from guardrt.kernels.timer import on_device

triton: Any = importlib.import_module("triton")
tl: Any = importlib.import_module("triton.language")

BLOCK_N, BLOCK_K = 64, 64
# (columns, K per iteration) a program can take: the default, and narrower column blocks with
# longer K steps. A decode step's grid is only N / block_n programs wide (64 for N = 4096 at the
# default, fewer than an H100's 132 SMs); narrower blocks give more programs, longer K steps keep
# each load as large. Which is fastest is measured per layer shape at load (int8_rows.py).
BLOCKS: tuple[tuple[int, int], ...] = ((BLOCK_N, BLOCK_K), (32, 128), (16, 256))


def block_m(m: int) -> int:
    """Rows per program: each program reads its column block's weights once, so the weights are
    read ceil(M / block) times; 16 rows suit a decode step, more rows the larger steps the
    dispatch sends here (untuned: benchmarks/kernels.py measures it on the GPU)."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


@triton.jit  # type: ignore[untyped-decorator]
def _int8_linear_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913, PLR0917
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr,
    m, n,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_ym, stride_yn,
    k: tl.constexpr,  # one compile per layer width; the K loop's bounds are plain ints
    has_bias: tl.constexpr, bm: tl.constexpr, bn: tl.constexpr, bk: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * bm + tl.arange(0, bm)  # (bm,) rows of x / y
    cols = tl.program_id(1) * bn + tl.arange(0, bn)  # (bn,) output channels
    acc = tl.zeros((bm, bn), dtype=tl.float32)
    for start in range(0, k, bk):
        inner = start + tl.arange(0, bk)  # (bk,)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + inner[None, :] * stride_xk,
            mask=(rows[:, None] < m) & (inner[None, :] < k),
            other=0.0,
        )  # (bm, bk)
        q = tl.load(
            q_ptr + cols[None, :] * stride_qn + inner[:, None] * stride_qk,
            mask=(cols[None, :] < n) & (inner[:, None] < k),
            other=0,
        )  # (bk, bn) int8: the weight's transpose, read in place
        acc += tl.dot(x, q.to(x.dtype))
    scale = tl.load(s_ptr + cols, mask=cols < n, other=0.0)  # (bn,) fp32
    acc = acc * scale[None, :]
    if has_bias:
        acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rows[:, None] < m) & (cols[None, :] < n),
    )


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: Mapping[int, tuple[int, int]] | None = None,
) -> torch.Tensor:
    """x (..., K) in fp32/fp16/bf16; qweight (N, K) int8; scales (N, 1) or (N,) fp32 (one per
    output channel); bias (N,) or None → (..., N) in x's dtype. `blocks`: (block_n, block_k) by
    rows per program (`block_m`), as measured for this layer; (BLOCK_N, BLOCK_K) otherwise."""
    if qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8, not {qweight.dtype}")
    if scales.numel() != qweight.shape[0]:
        raise ValueError(
            f"{scales.numel()} scales for {qweight.shape[0]} output channels: the kernel takes "
            "one scale per channel (per-group weights use the reference forward)"
        )
    n, k = qweight.shape
    flat = x.reshape(-1, k)  # (M, K)
    m = flat.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = block_m(m)
    bn, bk = (blocks or {}).get(bm, (BLOCK_N, BLOCK_K))
    if (bn, bk) not in BLOCKS:
        raise ValueError(f"blocks {(bn, bk)} not among {BLOCKS}")
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    with on_device(x.device):  # Triton launches on the current device, not x's
        _int8_linear_kernel[grid](
            flat, qweight, scales.reshape(-1).to(torch.float32).contiguous(),
            bias if bias is not None else scales, out,
            m, n,
            flat.stride(0), flat.stride(1), qweight.stride(0), qweight.stride(1),
            out.stride(0), out.stride(1),
            k=k, has_bias=bias is not None, bm=bm, bn=bn, bk=bk,
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)
