"""The decoder's RMSNorm (alone, or with the residual add before it) and rotate-half RoPE as one
Triton kernel each (references: `fused.py`).

In plain PyTorch an RMSNorm is 8 kernels (cast to fp32, square, mean, + eps, rsqrt, multiply,
cast back, times the weight) and a RoPE 5 (negate, concatenate, two products, a sum). At a text
prefill's sizes (a few hundred rows of 4,096) each of those kernels moves ~2 MB and costs its
~3 µs launch-and-ramp on the GPU even inside a CUDA graph; the eager H100 profile
(benchmarks/results/h100-profile-eager.txt, text `safe`) spent ~4 ms of its 16 ms of GPU time in
them, against a 14 ms target. Here each is one kernel that reads its inputs once.

The arithmetic follows the references step for step, including their roundings: RMSNorm
squares, averages and scales in fp32, rounds to the input's dtype, then multiplies by the weight
in fp32 and rounds again, as `weight * normed.to(x.dtype)` does; RoPE rounds each of its two
products to the dtype before the sum, as the reference's separate `x * cos` and `rotated * sin`
do. So RoPE is bit-exact (fp32 with FMA contraction off) and RMSNorm differs only by the order
of its 4,096-term sum (and the GPU's rsqrt). A layer's residual add and the norm after it are
one pass (`add_rms_norm`): the sum is rounded to the dtype as torch's `x + delta` rounds it,
stored (bit-exact), and normalised from registers, so the add's own kernel and the norm's
re-read of the sum are gone (two of each per decoder layer). Tested under Triton's CPU
interpreter in fp16 and fp32 (it has no correct bf16); bf16, the GPU's dtype, is checked on the
GPU when a model loads (`fused.verify`) and by benchmarks/norm_rope.py.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from guardrt.kernels import fused
from guardrt.kernels.timer import on_device

triton: Any = importlib.import_module("triton")
tl: Any = importlib.import_module("triton.language")

_NORM_ELEMENTS = 4096  # per program: one row of the decoder's width, or 32 rows of a head's
# Triton compiles a kernel again for each integer argument equal to 1 or divisible by 16. The
# kernels' sizes (rows, batch, tokens, heads) only enter index arithmetic and masks, so they are
# not specialized (`do_not_specialize`): one compile serves every step. Strides are: divisible
# by 16 (the model's always are), they let a row's loads be vectorized.


@triton.jit(do_not_specialize=("rows", "n1", "n2"))  # type: ignore[untyped-decorator]
def _rms_norm_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913, PLR0917
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr,
    rows, n1, n2,
    sx0, sx1, sx2, sr0, sr1, sr2, sy0, sy1, sy2,
    eps,
    d: tl.constexpr, block_d: tl.constexpr, block_r: tl.constexpr, residual: tl.constexpr,
):  # fmt: skip
    row = (tl.program_id(0) * block_r + tl.arange(0, block_r)).to(tl.int64)  # (R,)
    i0, i1, i2 = row // (n1 * n2), (row // n2) % n1, row % n2  # the row's 3 leading indices
    cols = tl.arange(0, block_d)  # (D',)
    mask = (row[:, None] < rows) & (cols[None, :] < d)  # (R, D')
    x_rows = x_ptr + (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # (R, D')
    dtype = y_ptr.dtype.element_ty
    y_offsets = (i0 * sy0 + i1 * sy1 + i2 * sy2)[:, None]  # the sum is laid out as y
    if residual:  # x + delta rounded to the dtype (torch's add), stored, then normalised
        r_rows = r_ptr + (i0 * sr0 + i1 * sr1 + i2 * sr2)[:, None]
        delta = tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        summed = (x + delta).to(dtype)
        tl.store(s_ptr + y_offsets + cols[None, :], summed, mask=mask)
        x = summed.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=1) / d + eps)  # (R,)
    normed = (x * inv[:, None]).to(dtype).to(tl.float32)  # rounded, as `.to(x.dtype)`
    w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)  # (D',)
    tl.store(y_ptr + y_offsets + cols[None, :], (w[None, :] * normed).to(dtype), mask=mask)


@triton.jit(do_not_specialize=("seq", "heads"))  # type: ignore[untyped-decorator]
def _rope_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913, PLR0917
    x_ptr, cos_ptr, sin_ptr, y_ptr,
    seq, heads,
    sxb, sxh, sxs, syb, syh, sys, scb, scs, ssb, sss,
    half: tl.constexpr, block_half: tl.constexpr, block_h: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # b · seq + s
    b, s = token // seq, token % seq
    h = (tl.program_id(1) * block_h + tl.arange(0, block_h)).to(tl.int64)  # (Hb,) heads
    j = tl.arange(0, block_half)  # (half',) columns of each half
    jm = j < half
    mask = (h[:, None] < heads) & jm[None, :]  # (Hb, half')
    c = cos_ptr + b * scb + s * scs
    n = sin_ptr + b * ssb + s * sss
    c1 = tl.load(c + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c + half + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(n + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(n + half + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    x = x_ptr + b * sxb + s * sxs + h[:, None] * sxh  # (Hb, 1) the heads' rows
    x1 = tl.load(x + j[None, :], mask=mask, other=0.0).to(tl.float32)  # (Hb, half')
    x2 = tl.load(x + half + j[None, :], mask=mask, other=0.0).to(tl.float32)
    dtype = y_ptr.dtype.element_ty
    # out = x·cos + rotate_half(x)·sin with rotate_half(x) = [−x2, x1]; each product rounded.
    # a + (−x2·s1) is written a − x2·s1: IEEE defines a − b as a + (−b), and negating in the
    # kernel (0 − x) would turn −(+0) into +0 where the reference's negation gives −0.
    y1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
    y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    y = y_ptr + b * syb + s * sys + h[:, None] * syh
    tl.store(y + j[None, :], y1.to(dtype), mask=mask)
    tl.store(y + half + j[None, :], y2.to(dtype), mask=mask)


def empty_in_order(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped and typed as x whose memory runs in the order of x's
    strides (what an elementwise op of x returns): the q/k heads of a fused qkv projection are
    strided views, and the output keeps their (B, S, H, D) layout rather than transposing."""
    order = sorted(range(x.dim()), key=x.stride, reverse=True)  # outermost first
    inverse = sorted(range(x.dim()), key=order.__getitem__)
    flat = torch.empty([x.shape[i] for i in order], dtype=x.dtype, device=x.device)
    return flat.permute(inverse)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) with ≤ 3 leading dims and unit stride along D, weight (D,) of x's dtype →
    (..., D) of x's dtype laid out as x."""
    _, out = _norm(x, None, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, its RMSNorm) in one pass: a layer's residual add and the next norm. delta
    shaped and typed as x, unit stride along D; both outputs laid out as x."""
    if delta.shape != x.shape or delta.dtype != x.dtype or delta.stride(-1) != 1:
        raise ValueError(
            f"add_rms_norm kernel takes a delta shaped and typed as x with unit stride along "
            f"the last dim: x {tuple(x.shape)} {x.dtype}, delta {tuple(delta.shape)} "
            f"{delta.dtype} strides {delta.stride()}"
        )
    summed, out = _norm(x, delta, weight, eps)
    assert summed is not None
    return summed, out


def _norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The launch behind both wrappers: (x + delta or None, RMSNorm of x or of the sum)."""
    if x.dim() > 4 or x.stride(-1) != 1 or weight.dtype != x.dtype:
        raise ValueError(
            f"rms_norm kernel takes ≤ 4 dims, unit stride along the last and a weight of the "
            f"input's dtype: got shape {tuple(x.shape)}, strides {x.stride()}, {weight.dtype} "
            f"weight for {x.dtype} input"
        )
    d = x.shape[-1]
    out = empty_in_order(x)
    summed = None if delta is None else empty_in_order(x)  # same strides as out
    pad = [0] * (4 - x.dim())
    lead = [1] * (4 - x.dim()) + list(x.shape[:-1])  # (n0, n1, n2)
    xs = pad + list(x.stride()[:-1])
    rs = xs if delta is None else pad + list(delta.stride()[:-1])
    ys = pad + list(out.stride()[:-1])
    rows = lead[0] * lead[1] * lead[2]
    block_d = triton.next_power_of_2(d)
    block_r = max(1, _NORM_ELEMENTS // block_d)
    if rows:
        with on_device(x.device):  # Triton launches on the current device, not x's
            _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
                x, x if delta is None else delta, weight.contiguous(), out,
                out if summed is None else summed,
                rows, lead[1], lead[2], *xs, *rs, *ys, eps,
                d=d, block_d=block_d, block_r=block_r, residual=delta is not None,
                num_warps=8 if block_d >= 2048 else 4,
            )  # fmt: skip
    return summed, out


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """Rotate-half RoPE: x (B, H, S, D) with unit stride along D (any other strides), cos/sin
    (B, S, D) of x's dtype, or broadcastable to it → (B, H, S, D) laid out as x; with
    `in_place`, written over x and x returned (each program reads both halves of its rows
    before it writes them, and no two programs share a row; x's rows must not overlap)."""
    b, heads, seq, d = x.shape
    if d % 2 or x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError(f"rope kernel takes an even D with unit stride: x {tuple(x.shape)}")
    if not fused.broadcasts(x, cos, sin):
        raise ValueError(f"cos/sin {tuple(cos.shape)} for x {tuple(x.shape)}: want (B, S, D)")
    cos, sin = cos.expand(b, seq, d), sin.expand(b, seq, d)  # a broadcast dim: stride 0
    if not (x.dtype == cos.dtype == sin.dtype):
        raise ValueError(f"rope kernel takes one dtype: x {x.dtype}, cos {cos.dtype}")
    if in_place and 0 in x.stride()[:3]:
        raise ValueError(f"rope in place needs rows that do not overlap: strides {x.stride()}")
    out = x if in_place else empty_in_order(x)
    block_h = min(triton.next_power_of_2(heads), 16)
    if out.numel():
        with on_device(x.device):  # Triton launches on the current device, not x's
            _rope_kernel[(b * seq, triton.cdiv(heads, block_h))](
                x, cos, sin, out, seq, heads,
                x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                out.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
                half=d // 2, block_half=triton.next_power_of_2(d // 2), block_h=block_h,
                enable_fp_fusion=False,  # fp32: no FMA, each product rounded as the reference's
            )  # fmt: skip
    return out
