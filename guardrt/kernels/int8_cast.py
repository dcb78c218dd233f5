"""int8 weight-only linear for the steps the Triton kernel declines: the weight cast to the
activations' dtype, one cuBLAS matmul, the per-channel scale applied to the product.

The reference forward (`QuantizedLinear`'s, what tracers and exporters see) dequantizes to fp32
and then casts: ~21 bytes of traffic per weight (read 1, write and read 4 twice, write and read
2) before the matmul, which made int8 prefills slower than bf16 ones on the H100 (80 vs 58 ms for
a text verdict, 168 vs 89 ms with an image). Here the cast is exact (every int8 value is a bf16
and an fp16 value: |q| ≤ 127 needs 7 significant bits) and costs 3 bytes a weight, the matmul
reads 2 as bf16's does, and the scale factors out of the K sum, so it is applied once to the
(M, N) product in fp32, as the Triton kernel applies it to its accumulator. The product is
rounded to the activations' dtype before the scale (cuBLAS returns it so): one rounding more than
the reference, of the same size as the reference's own rounding of each weight. bf16 only: the
product before the scale is ~1/scale (~10³) times the output, which fp16's range (65,504) would
overflow for outputs above ~50; bf16 has fp32's range.
"""

from __future__ import annotations

import torch

from guardrt.kernels.scaling import rescale


def int8_cast_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (..., K) bf16; qweight (N, K) int8; scales (N, 1) or (N,) fp32 (one per output
    channel); bias (N,) or None → (..., N) bf16."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the cast path takes bf16 activations, not {x.dtype} (fp16 overflows)")
    n, k = qweight.shape
    flat = x.reshape(-1, k)  # (M, K)
    product = flat @ qweight.to(x.dtype).t()  # (M, N), fp32 accumulation inside cuBLAS
    return rescale(product, None, scales, bias, x.dtype).reshape(*x.shape[:-1], n)
