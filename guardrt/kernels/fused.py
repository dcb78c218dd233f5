"""The decoder's RMSNorm (alone or after a residual add), RoPE and SwiGLU product: their
plain-PyTorch references, and when the fused Triton kernels (`norm_rope.py`, `silu_mul.py`) run
instead.

The kernels run for CUDA tensors (sm ≥ 8.0, not ROCm) of bf16, fp16 or fp32 when triton is
importable, nothing is tracing or compiling (exported graphs keep the reference's plain ops),
and no load-time check on this process's GPU has refused them: `verify` runs the kernels on the
model's own shapes and layouts against the references when the engine loads
(`guardrt/runtime/model/tune.py`), and a kernel that raises or disagrees there is never used
again in the process (a Triton build that mis-compiles on this GPU must not take the verdicts
with it). Everything else, the CPU included, runs the references.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F  # noqa: N812

from guardrt.kernels import device

log = logging.getLogger(__name__)

# How far the fused RMSNorm and SwiGLU product may sit from the references, relative to the
# reference's value: two ulps of the output dtype. The norm's sum runs in another order, and the
# GPU's rsqrt, exp (ex2.approx: up to ~4e-6 relative for large |g|) and division differ from
# torch's by a few fp32 ulps; rounding to the dtype, then the product rounded again, keeps that
# within two ulps of bf16 and fp16 (one exception: an fp16 silu in the subnormal range, g in
# about [−20.5, −12], may round one subnormal step away, 2⁻²⁴·|up|). RoPE must match exactly.
TWO_ULPS = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 1e-5}

# (batch, tokens) of verify's probes: a prefill, a padded bucket, decode steps of 1, 2 and 32.
_PROBES = ((1, 1), (1, 37), (1, 64), (2, 1), (2, 37), (32, 1))
_refused: list[str] = []  # why the kernels were refused in this process (empty: not refused)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x·rsqrt(mean(x²) + eps) computed in fp32, cast back, then scaled (as HF and Meta)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the norm after it: (x + delta, its RMSNorm)."""
    summed = x + delta
    return summed, rms_norm_reference(summed, weight, eps)


def rope_heads_reference(
    heads: torch.Tensor, rotated: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """RoPE on the first `rotated` of heads (B, N, S, D), the others as they are: a new tensor."""
    return torch.cat((rope_reference(heads[:, :rotated], cos, sin), heads[:, rotated:]), dim=1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x (B, H, S, D) with cos/sin (B, S, D) (HF's layout of q/k rows)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def can_fuse(
    x: torch.Tensor,
    others: tuple[torch.Tensor, ...],
    capability: device.Capability | None,
    has_triton: bool,
) -> bool:
    """The decision on tensor metadata, for x and the tensors combined with it, on a CUDA
    device of `capability` (None: not a CUDA device); the tests call it with CPU tensors."""
    if not device.triton_runs(capability, has_triton):
        return False
    if x.dim() == 0 or x.dtype not in device.KERNEL_DTYPES or x.stride(-1) != 1:
        return False
    return all(o.dtype == x.dtype and o.stride(-1) == 1 for o in others)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's inner product: silu(gate) · up."""
    return F.silu(gate) * up


def applies(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the fused kernel runs for x and `others` in this process, now."""
    if _refused or x.device.type != "cuda" or device.recording():
        return False
    capability = device.cuda_capability(x.device)
    return can_fuse(x, others, capability, device.triton_available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., D) by weight (D,): the fused kernel where it applies (≤ 4 dims)."""
    if x.dim() <= 4 and applies(x, weight):
        out: torch.Tensor = _kernels().rms_norm(x, weight, eps)
        return out
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, its RMSNorm by weight): one fused kernel where it applies (delta shaped as
    x, ≤ 4 dims); (x, RMSNorm of x) when delta is None (nothing to add)."""
    if delta is None:
        return x, rms_norm(x, weight, eps)
    if x.dim() <= 4 and delta.shape == x.shape and applies(x, delta, weight):
        summed, out = _kernels().add_rms_norm(x, delta, weight, eps)
        return summed, out
    return add_rms_norm_reference(x, delta, weight, eps)


def rope_heads(
    heads: torch.Tensor, rotated: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """heads (B, N, S, D), the q, k and v heads of one fused projection's output: RoPE on the
    first `rotated` (q and k), the others (v) as they are → (B, N, S, D). Where the kernel
    applies it rotates them in place, one launch for q and k, and returns `heads` itself, so
    k and v stay side by side for one cache write; elsewhere a new tensor (the reference
    values; heads is left as it was)."""
    part = heads[:, :rotated]  # (B, R, S, D)
    if (
        heads.dim() == 4
        and heads.shape[-1] % 2 == 0
        and 0 not in heads.stride()[:3]
        and broadcasts(part, cos, sin)
        and applies(part, cos, sin)
    ):
        _kernels().rope(part, cos, sin, in_place=True)
        return heads
    return rope_heads_reference(heads, rotated, cos, sin)


def broadcasts(x: torch.Tensor, *tables: torch.Tensor) -> bool:
    """Whether each table (cos, sin) is (B, S, D) for x (B, H, S, D), or broadcasts to it."""
    b, _, s, d = x.shape
    return all(
        t.dim() == 3 and t.shape[2] == d and t.shape[0] in (1, b) and t.shape[1] in (1, s)
        for t in tables
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gate, up (..., I): the fused kernel where it applies (≤ 3 dims)."""
    if gate.dim() <= 3 and gate.shape == up.shape and applies(gate, up):
        out: torch.Tensor = _silu_kernel().silu_mul(gate, up)
        return out
    return silu_mul_reference(gate, up)


@dataclass(frozen=True)
class Shapes:
    """The decoder's sizes the kernels meet: norms over `hidden` and over `head_dim` (the cross
    layers' q/k norms), RoPE on q and k split from one fused qkv projection, the SwiGLU product
    on the halves of one fused gate/up projection of `intermediate` each."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    intermediate: int


def verify(target: torch.device, dtype: torch.dtype, shapes: Shapes) -> str:
    """Run the kernels on `shapes`' layouts against the references on `target`; refuse them
    for the process on any error or disagreement. Returns "used", "not used (...)" or
    "refused: why" (for the load log and the benchmark's report).

    Run at batches of 1, 2 and 32 and 1, 37 and 64 tokens: Triton compiles a kernel again for
    integer arguments (sizes and strides) equal to 1 or divisible by 16, so these are the
    variants a served step can meet (a prefill, a batch's decode step, a padded bucket)."""
    probe = torch.empty(0, dtype=dtype, device=target)
    if _refused:
        return f"refused: {_refused[0]}"
    if not applies(probe):
        return "not used (the references run: not a CUDA GPU with triton, or not bf16/fp16/fp32)"
    try:
        problem = next(
            (p for b, t in _PROBES if (p := _disagreement(target, dtype, shapes, b, t))), ""
        )
    except Exception as exc:  # noqa: BLE001 (a kernel that cannot run here is refused)
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    if problem:
        _refused.append(problem)
        log.warning(
            "fused norm/RoPE/SwiGLU kernels refused on this GPU (%s); references run", problem
        )
        return f"refused: {problem}"
    return "used"


def _disagreement(
    target: torch.device, dtype: torch.dtype, s: Shapes, batch: int, tokens: int
) -> str:
    generator = torch.Generator(device=target).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=target, dtype=torch.float32)

    kernels = _kernels()
    x = (randn(batch, tokens, s.hidden) * 3).to(dtype)  # (B, S, D)
    heads = randn(batch, tokens, s.heads, s.head_dim).to(dtype).transpose(1, 2)  # (B, H, S, d)
    for name, value, weight in (("hidden", x, s.hidden), ("head", heads, s.head_dim)):
        w = (1 + randn(weight) / 4).to(dtype)
        got, want = kernels.rms_norm(value, w, s.eps), rms_norm_reference(value, w, s.eps)
        if (error := _off_by(got, want, dtype)) is not None:
            return f"rms_norm over the {name} ({weight}) differs from the reference by {error:.3g}"
    w = (1 + randn(s.hidden) / 4).to(dtype)
    delta = (randn(batch, tokens, s.hidden) * 3).to(dtype)  # (B, S, D), a branch's output
    got_sum, got = kernels.add_rms_norm(x, delta, w, s.eps)
    want_sum, want = add_rms_norm_reference(x, delta, w, s.eps)
    if (error := _off_by(got_sum, want_sum)) is not None:  # one rounding, as torch's add
        return f"add_rms_norm's sum differs from the reference by {error:.3g}"
    if (error := _off_by(got, want, dtype)) is not None:
        return f"add_rms_norm's norm differs from the reference by {error:.3g}"
    width = (s.heads + 2 * s.kv_heads) * s.head_dim
    qkv = randn(batch, tokens, width).to(dtype)  # (B, S, (H + 2·Hkv)·d), as the fused projection
    heads = qkv.view(batch, tokens, -1, s.head_dim).transpose(1, 2)  # (B, N, S, d) strided views
    angles = randn(batch, tokens, s.head_dim // 2) * 100
    cos, sin = (torch.cat((a, a), dim=-1).to(dtype) for a in (angles.cos(), angles.sin()))
    rotated = s.heads + s.kv_heads  # q and k, rotated in place as `rope_heads` does; v kept
    want = rope_heads_reference(heads, rotated, cos, sin)
    got = qkv.clone().view(batch, tokens, -1, s.head_dim).transpose(1, 2)
    kernels.rope(got[:, :rotated], cos, sin, in_place=True)
    for name, part in (("q", slice(0, s.heads)), ("k", slice(s.heads, rotated)),
                       ("v (kept)", slice(rotated, None))):  # fmt: skip
        if (error := _off_by(got[:, part], want[:, part])) is not None:
            return f"rope on {name} differs from the reference by {error:.3g}"
    gate_up = (randn(batch, tokens, 2 * s.intermediate) * 4).to(dtype)  # (B, S, 2·I)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views, as the fused projection's halves
    got, want = _silu_kernel().silu_mul(gate, up), silu_mul_reference(gate, up)
    if (error := _off_by(got, want, dtype)) is not None:
        return f"silu_mul differs from the reference by {error:.3g}"
    return ""


def _off_by(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None
) -> float | None:
    """None when got matches want, exactly or (given the dtype) within two of its ulps;
    otherwise their largest difference."""
    if dtype is None:
        close = torch.equal(got, want)
    else:
        close = torch.allclose(got.float(), want.float(), rtol=TWO_ULPS[dtype], atol=1e-6)
    return None if close else float((got.float() - want.float()).abs().max())


@functools.cache
def _kernels() -> ModuleType:
    """norm_rope.py, imported on first use (it imports triton)."""
    return importlib.import_module("guardrt.kernels.norm_rope")


@functools.cache
def _silu_kernel() -> ModuleType:
    """silu_mul.py, imported on first use (it imports triton)."""
    return importlib.import_module("guardrt.kernels.silu_mul")
