"""int8 weight + activation linear through `torch._int_mm`: y = (sx ⊙ xq) · (sw ⊙ wq)ᵀ + b.

The weights are int8 with one fp32 scale per output channel (`quantize_weight(..., "int8")`);
this quantizes the activations per row (token) on the fly, symmetric: scale = max|x| / 127,
xq = round(x / scale). The product runs on the int8 tensor cores (every NVIDIA GPU since Turing:
twice the bf16 rate, where fp8 needs Ada or Hopper) with exact int32 accumulation; the scales
are applied once to the result. It is the torch back end's "weight+activation" int8 compute,
the same scheme as the ONNX engine's (`guardrt export build --int8-compute`), and it is opt-in:
rounding each activation to 8 bits moves scores more than weight-only int8 does, most on
activation outliers, which real checkpoints have and random weights do not.

`int8_dynamic_reference` is the same math in plain PyTorch (float64 accumulation, exact here), for
the tests and `benchmarks/kernels.py`.
`torch._int_mm` also runs on the CPU. Its CUDA contract (torch's `_int_mm_out_cuda`): a (M, K)
int8 row-major with M > 16, b (K, N) int8 column-major (the `.t()` of a row-major (N, K)
weight), K and N multiples of 8; int32 out.
"""

from __future__ import annotations

import torch

from guardrt.kernels.activation_quant import quantize_activations, rescale_product
from guardrt.kernels.scaling import rescale

INT8_MAX = 127.0
INT_MM_ALIGNMENT = 8  # K and N must be multiples of this
INT_MM_MIN_ROWS = 17  # M must be greater than 16 on CUDA


def int_mm_takes(m: int, n: int, k: int) -> bool:
    """Whether `_int_mm` takes an (M, K) × (K, N) product on CUDA."""
    return m >= INT_MM_MIN_ROWS and n % INT_MM_ALIGNMENT == 0 and k % INT_MM_ALIGNMENT == 0


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) fp32/fp16/bf16 → (xq (..., K) int8, scales (..., 1) fp32), x ≈ scales · xq;
    each row's largest magnitude maps to ±127 (within an fp32 rounding). An all-zero row gets
    scale 1 and stays zero."""
    wide = x.to(torch.float32)
    # · fp32(1/127), not / 127: the same value on every device (see `fp8_linear.quantize_rows`)
    scales = wide.abs().amax(dim=-1, keepdim=True) * (1.0 / INT8_MAX)  # (..., 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    xq = torch.round(wide / scales).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return xq, scales


def int8_dynamic_reference(
    xq: torch.Tensor,
    x_scales: torch.Tensor,
    wq: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """xq (M, K) int8, x_scales (M, 1), wq (N, K) int8, w_scales (N, 1) or (N,), bias (N,) or
    None → (M, N) `out_dtype`: the integer product exactly, then the scales in fp32. float64,
    not int64: CUDA has no integer matmul, and every partial sum (at most 127² · K, 2.3e8 for
    K = 14,336) is an integer far below 2⁵³, so float64 holds it exactly on every device."""
    acc = xq.to(torch.float64) @ wq.to(torch.float64).t()  # (M, N), exact
    return rescale(acc, x_scales, w_scales, bias, out_dtype)


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K); qweight (N, K) int8, row-major; scales (N, 1) fp32 (one per output channel);
    bias (N,) or None → (..., N) in x's dtype. The dispatch checks `int_mm_takes` first."""
    n, k = qweight.shape
    # (M, K) int8, (M, 1) fp32: one fused kernel on the GPU (activation_quant.py), same values
    xq, x_scales = quantize_activations(x.reshape(-1, k), "int8", quantize_rows_int8)
    acc = torch._int_mm(xq.contiguous(), qweight.t())  # (M, N) int32, exact
    out = rescale_product(acc, x_scales, scales, bias, x.dtype)  # fused on GPUs
    return out.reshape(*x.shape[:-1], n)
