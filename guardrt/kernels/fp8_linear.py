"""fp8 (e4m3) linear through `torch._scaled_mm` with rowwise scales: y = (sx ⊙ xq) · (sw ⊙ wq)ᵀ + b.

The weights are already e4m3 with one fp32 scale per output channel (`quantize_weight(...,
kind="fp8")`); this quantizes the activations too, one scale per row (token), computed on the fly,
so the GEMM runs on the fp8 tensor cores (compute capability ≥ 8.9) and reads half the bytes of a
bf16 weight. That changes the numerics against the reference forward (`QuantizedLinear`:
dequantize, then a bf16 matmul): each activation is rounded to e4m3 (≤ 2⁻⁴ relative), so parity
checks force the reference.

`scaled_mm_reference` is the same math in plain fp32 PyTorch, for the tests. `torch._scaled_mm`
with rowwise scales also runs on the CPU in torch 2.13 (checked: the tests compare it with the
reference); on the GPU it has only the benchmark (`benchmarks/kernels.py`) behind it.

`_scaled_mm`'s rowwise contract (torch's `aten/src/ATen/native/cuda/ScaledBlas.cpp`,
`_scaled_mm_out_cuda`, and `torch/_meta_registrations.py`, `_check_scaled_mm_sizes`):
  - a (M, K) fp8 row-major, b (K, N) fp8 column-major: the `.t()` of a row-major (N, K) weight;
  - K % 16 == 0 and N % 16 == 0 (M is free);
  - scale_a (M, 1) and scale_b (1, N), both fp32 and contiguous;
  - bias (N,) bf16 for a bf16 output, fp16 for an fp16 output; no bias with an fp32 output.
"""

from __future__ import annotations

import torch

from guardrt.kernels.activation_quant import quantize_activations
from guardrt.kernels.scaling import rescale

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
FP8_OUT_DTYPES = (torch.bfloat16, torch.float16)  # outputs that may carry a bias (see above)
SCALED_MM_ALIGNMENT = 16  # K and N must be multiples of this


def scaled_mm_takes(n: int, k: int) -> bool:
    """Whether `_scaled_mm` takes an (N, K) weight: both multiples of 16."""
    return n % SCALED_MM_ALIGNMENT == 0 and k % SCALED_MM_ALIGNMENT == 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) fp32/fp16/bf16 → (xq (..., K) float8_e4m3fn, scales (..., 1) fp32) with
    x ≈ scales · xq: scale = max|x| over the row · (1/448), so each row's largest value maps to
    ±448 (within an fp32 rounding).

    An all-zero row gets scale 1 (not 0, which would divide 0 by 0) and stays exactly zero. The
    scale is fp32: one rounded to bf16 would not be the one `_scaled_mm` multiplies by. It is a
    product with fp32(1/448), not a division by 448, because torch's CUDA `tensor / python
    scalar` multiplies by the reciprocal while its CPU kernel divides: the product is the same
    value on every device, and the fused kernel (`row_quant.py`) computes it the same way.
    """
    wide = x.to(torch.float32)
    scales = wide.abs().amax(dim=-1, keepdim=True) * (1.0 / E4M3_MAX)  # (..., 1)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    # The clamp matters for rows of fp32 subnormals (max|x| ≲ 1e-38): max|x| / 448 loses
    # precision there and x / scale reaches ~670. e4m3fn has no infinity: torch 2.13's cast
    # saturates past 448, but torch before pytorch/pytorch#178817 (2026) gave NaN from 480 up on
    # the CPU, so the cast never sees such a value.
    xq = (wide / scales).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, scales


def scaled_mm_reference(
    xq: torch.Tensor,
    x_scales: torch.Tensor,
    wq: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """What `torch._scaled_mm(xq, wq.t(), x_scales, w_scales (1, N), bias, out_dtype)` computes,
    in fp32: xq (M, K) e4m3, x_scales (M, 1) fp32, wq (N, K) e4m3, w_scales (N, 1) or (N,) fp32,
    bias (N,) or None → (M, N) `out_dtype`. Scales are applied to the fp32 accumulator (the
    epilogue's order: (acc · sx) · sw + b), then one rounding to `out_dtype`."""
    acc = xq.to(torch.float32) @ wq.to(torch.float32).t()  # (M, N)
    return rescale(acc, x_scales, w_scales, bias, out_dtype)


def fp8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) bf16/fp16; qweight (N, K) float8_e4m3fn, row-major; scales (N, 1) fp32 (one
    per output channel); bias (N,) in x's dtype or None → (..., N) in x's dtype. K and N must be
    multiples of 16 (`scaled_mm_takes`); the dispatch checks that before calling."""
    n, k = qweight.shape
    # (M, K) e4m3, (M, 1) fp32: one fused kernel on the GPU (activation_quant.py), same values
    xq, x_scales = quantize_activations(x.reshape(-1, k), "fp8", quantize_rows)
    out = torch._scaled_mm(
        xq.contiguous(),  # row-major (a permuted x keeps its strides through the elementwise ops)
        qweight.t(),  # (K, N) column-major: the layout cuBLASLt and CUTLASS take
        scale_a=x_scales,
        scale_b=scales.to(torch.float32).reshape(1, n),
        bias=None if bias is None else bias.contiguous(),
        out_dtype=x.dtype,
    )  # (M, N)
    return out.reshape(*x.shape[:-1], n)
