"""The epilogue every 8-bit product shares: an fp32 accumulator times the activations' per-row
and the weights' per-channel scales, plus the bias, then one rounding to the output dtype."""

from __future__ import annotations

import torch


def rescale(
    acc: torch.Tensor,
    x_scales: torch.Tensor | None,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """acc (M, N) (any dtype, taken to fp32), x_scales (M, 1) or None (activations that were
    not quantized), w_scales (N, 1) or (N,), bias (N,) or None → (M, N) `out_dtype`:
    (acc · sx) · sw + b in fp32."""
    out = acc.to(torch.float32, copy=True)  # (M, N): one fp32 temporary, then in place
    if x_scales is not None:
        out.mul_(x_scales.to(torch.float32))
    out.mul_(w_scales.to(torch.float32).reshape(1, -1))
    if bias is not None:
        out.add_(bias.to(torch.float32))
    return out.to(out_dtype)
