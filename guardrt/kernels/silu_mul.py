"""SwiGLU's `silu(gate) * up` as one Triton kernel (reference: `fused.silu_mul_reference`).

In plain PyTorch it is two kernels over (rows, 14,336): `silu` reads the gate half of the fused
gate/up output and writes a new tensor, the product reads that and the up half and writes
another. One kernel reads both halves once and writes the product: per decoder layer, a text
prefill of ~221 rows moves 19 MB instead of 32 MB, a batch of 32 prefills 0.6 GB instead of 1 GB,
and a decode step saves a launch. The arithmetic follows the reference's roundings: silu in fp32
(g / (1 + e^−g)) rounded to the dtype, then the product in fp32 rounded again; only the GPU's
exp (ex2.approx, up to ~4e-6 relative for large |g|) and division differ from torch's, so the
output is within two ulps of bf16 and fp16 (`fused.TWO_ULPS`), except an fp16 silu in the
subnormal range (g in about [−20.5, −12]), which may round one subnormal step away. Tested
under Triton's CPU interpreter (fp16, fp32); bf16 on the GPU
when a model loads (`fused.verify`) and by benchmarks/norm_rope.py.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from guardrt.kernels.timer import on_device

triton: Any = importlib.import_module("triton")
tl: Any = importlib.import_module("triton.language")

_BLOCK = 1024  # columns per program


@triton.jit(do_not_specialize=("n1",))  # type: ignore[untyped-decorator]
def _silu_mul_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913, PLR0917
    g_ptr, u_ptr, y_ptr,
    n1, width,
    sg0, sg1, su0, su1, sy0, sy1,
    block: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # i0 · n1 + i1
    i0, i1 = row // n1, row % n1
    cols = tl.program_id(1) * block + tl.arange(0, block)  # (block,)
    mask = cols < width
    g = tl.load(g_ptr + i0 * sg0 + i1 * sg1 + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i0 * su0 + i1 * su1 + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)  # rounded, as F.silu's output
    tl.store(y_ptr + i0 * sy0 + i1 * sy1 + cols, (silu * u).to(dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) with ≤ 2 leading dims, one shape and dtype, unit stride along I (the
    halves of a fused gate/up output are strided views) → silu(gate) · up (..., I), contiguous."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() > 3:
        raise ValueError(
            f"silu_mul kernel takes gate and up of one shape and dtype, ≤ 3 dims: got "
            f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}"
        )
    if gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"silu_mul kernel takes unit stride along the last dim: {gate.stride()}")
    width = gate.shape[-1]
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    pad = 3 - gate.dim()
    lead = [1] * pad + list(gate.shape[:-1])  # (n0, n1)
    strides = [[0] * pad + list(t.stride()[:-1]) for t in (gate, up, out)]  # (s0, s1) of each
    rows = lead[0] * lead[1]
    if rows and width:
        with on_device(gate.device):  # Triton launches on the current device, not the input's
            _silu_mul_kernel[(rows, triton.cdiv(width, _BLOCK))](
                gate, up, out, lead[1], width, *strides[0], *strides[1], *strides[2],
                block=_BLOCK, num_warps=4,
            )  # fmt: skip
    return out
