"""The 8-bit products' epilogue (`scaling.rescale`: (acc · sx) · sw + b in fp32, one rounding to
the output dtype) as one Triton kernel, bit for bit the reference; dispatched and checked at
load by `activation_quant.py`.

int8 weight+activation steps (`torch._int_mm`) return the exact int32 product, which the
reference scales in plain PyTorch: an fp32 copy, three in-place passes and a cast, ~38 bytes of
traffic an output element. For the vision tower's 6,432-row steps the product is 74 M elements a
layer: ~2.8 GB, ~1 ms on the H100, ~38 ms an image verdict. Here one pass reads the product and
writes the output: 6 bytes an element.

Exactness: the same fp32 operations in the same order, without FMA contraction (the launch sets
`enable_fp_fusion=False`: `out · sw + b` fused would round once where the reference rounds
twice); int32 → fp32 rounds to nearest as torch's cast does. A bf16 output is rounded from the
fp32 bits (round half to even, NaN kept), not by a conversion instruction: Triton's interpreter,
where the tests run, has no correct bf16.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from guardrt.kernels.device import KERNEL_DTYPES
from guardrt.kernels.timer import on_device

triton: Any = importlib.import_module("triton")
tl: Any = importlib.import_module("triton.language")

_BLOCK_M, _BLOCK_N = 32, 128


@triton.jit(do_not_specialize=("rows", "cols", "stride_a", "stride_y"))  # type: ignore[untyped-decorator]
def _rescale_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913, PLR0917
    acc_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr,
    rows, cols, stride_a, stride_y,
    has_sx: tl.constexpr, has_bias: tl.constexpr, bf16: tl.constexpr,
    block_m: tl.constexpr, block_n: tl.constexpr,
):  # fmt: skip
    r = (tl.program_id(0) * block_m + tl.arange(0, block_m)).to(tl.int64)  # (bm,)
    c = tl.program_id(1) * block_n + tl.arange(0, block_n)  # (bn,)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    out = tl.load(acc_ptr + r[:, None] * stride_a + c[None, :], mask=mask, other=0).to(tl.float32)
    if has_sx:
        out = out * tl.load(sx_ptr + r, mask=r < rows, other=1.0)[:, None]
    out = out * tl.load(sw_ptr + c, mask=c < cols, other=1.0)[None, :]
    if has_bias:
        out = out + tl.load(b_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
    if bf16:  # y_ptr is the bf16 output viewed as uint16: round the fp32 bits, half to even
        bits = out.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # a carry may reach ±inf, as RNE
        value = tl.where(out != out, 0x7FC0, rounded).to(tl.uint16)  # NaN stays NaN
    else:
        value = out.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + r[:, None] * stride_y + c[None, :], value, mask=mask)


def rescale(
    acc: torch.Tensor,
    x_scales: torch.Tensor | None,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """acc (M, N) int32/bf16/fp16/fp32 with unit stride along N, x_scales (M, 1) fp32 or None,
    w_scales (N, 1) or (N,) fp32, bias (N,) or None → (M, N) `out_dtype` (bf16, fp16 or fp32),
    contiguous, equal to `scaling.rescale`."""
    if acc.dim() != 2 or acc.stride(-1) != 1:
        raise ValueError(f"rescale takes (M, N) with unit stride along N: {acc.stride()}")
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"rescale writes bf16, fp16 or fp32, not {out_dtype}")
    rows, cols = acc.shape
    out = torch.empty((rows, cols), dtype=out_dtype, device=acc.device)
    sx = None if x_scales is None else x_scales.to(torch.float32).reshape(rows).contiguous()
    sw = w_scales.to(torch.float32).reshape(cols).contiguous()
    b = None if bias is None else bias.contiguous()
    bf16 = out_dtype == torch.bfloat16
    if rows and cols:
        grid = (triton.cdiv(rows, _BLOCK_M), triton.cdiv(cols, _BLOCK_N))
        with on_device(acc.device):  # Triton launches on the current device, not the input's
            _rescale_kernel[grid](
                acc, sw if sx is None else sx, sw, sw if b is None else b,
                out.view(torch.uint16) if bf16 else out,
                rows, cols, acc.stride(0), cols,
                has_sx=sx is not None, has_bias=b is not None, bf16=bf16,
                block_m=_BLOCK_M, block_n=_BLOCK_N, num_warps=4, enable_fp_fusion=False,
            )  # fmt: skip
    return out
