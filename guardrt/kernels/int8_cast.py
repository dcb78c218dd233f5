"""int8 weight-only linear for the steps the Triton kernel declines: the weight dequantized to
the activations' dtype in one pass, then one cuBLAS matmul (with the bias in its epilogue).

This is the reference forward's math (`QuantizedLinear`'s: scale · q in fp32, rounded once to
the activations' dtype, then `F.linear`), bit for bit, at a fraction of its traffic. The
reference runs it as three kernels, ~21 bytes a weight (read 1 and write 4, read 4 and write 2,
then the matmul reads 2), which made int8 prefills slower than bf16 ones on the H100 (80 vs 58 ms
for a text verdict, 168 vs 89 ms with an image). Here `torch.mul(q, scale, out=w)` is one
kernel on CUDA (TensorIterator casts int8 → fp32 on load and fp32 → bf16 on store), 3 bytes a
weight plus the matmul's 2.

An earlier version cast q to bf16 unscaled and applied the scale to the (M, N) product: the
same 3 bytes a weight, plus ~28 bytes for every output element (an fp32 copy of the product,
two in-place passes, a cast back). For the vision tower's 6,432-row steps the product is 5×
the weight, so that epilogue was ~2 GB of traffic a layer (~28 ms an image verdict at 2.96
TB/s), more than it saved; it was also one rounding away from the reference and could not
serve fp16 (the unscaled product overflows it). Dequantizing the weight costs the same at any
step size and gives the reference's values in bf16 and fp16 alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

CAST_DTYPES = (torch.bfloat16, torch.float16)


def dequantize_to(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qweight (N, K) int8, scales (N, 1) or (N,) fp32 (one per output channel) → (N, K) in
    `dtype`: scale · q in fp32, rounded once to `dtype` (= `QuantizedWeight.dequantize(dtype)`),
    computed and stored by one elementwise kernel on CUDA."""
    n, k = qweight.shape
    weight = torch.empty((n, k), dtype=dtype, device=qweight.device)
    torch.mul(qweight, scales.to(torch.float32).reshape(n, 1), out=weight)  # fp32 math, one store
    return weight


def int8_cast_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) bf16 or fp16; qweight (N, K) int8; scales (N, 1) or (N,) fp32 (one per output
    channel); bias (N,) in x's dtype or None → (..., N) in x's dtype, equal to the reference
    forward's output."""
    if x.dtype not in CAST_DTYPES:
        raise ValueError(f"the cast path takes bf16 or fp16 activations, not {x.dtype}")
    return F.linear(x, dequantize_to(qweight, scales, x.dtype), bias)
