"""How the vision tower's unmasked attention runs on this GPU, chosen by timing it at load.

The tower's joint attention over 4 tiles is one (1, 16, 6432, 80) attention per layer, 40 layers:
the largest single cost of an image verdict on the H100 (half of its GPU time before the padding
split; see benchmarks/results/h100-profile-eager.txt). Which kernel serves it best is a property
of the GPU and the torch build, not something to guess: head_dim 80 is not one of the sizes
attention kernels are tuned for (64, 128), and zero-padding q, k and v to 96 or 128 dims is exact
(zeros add nothing to q·k, the scale stays 1/√80, the extra output columns are zeros and dropped)
but costs more FLOPs. So at load the runtime times each SDPA back end at each width on the real
shape, checks every candidate's output against torch's default, and keeps the fastest.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch.nn.attention import SDPBackend, sdpa_kernel

from guardrt.kernels.timer import Timer, cuda_timer, on_device

# Tried on CUDA. MATH is left out: it materializes the (16, 6432, 6432) scores (2.6 GB in fp32).
CUDA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")
_WIDTHS = (64, 96, 128, 192, 256)  # sizes attention kernels are built for
# A candidate whose output differs from the default's by more than this (max |Δ| over the
# default's max |value|) is wrong, not merely rounded: bf16 steps are 2⁻⁸ of a value. Relative,
# because over thousands of keys N(0, 1) attention is nearly uniform and its outputs small
# (max ~0.1 at 6,432 keys): an absolute 2e-2 would let a softmax scale 2% off through.
_TOLERANCE = 2e-2


@dataclass(frozen=True)
class AttentionPlan:
    backend: str | None = None  # an SDPBackend name; None: torch's own choice
    head_dim: int | None = None  # q, k, v zero-padded to this many dims; None: as they are

    @property
    def name(self) -> str:
        return f"{self.backend or 'default'}/d={self.head_dim or 'as is'}"


DEFAULT_PLAN = AttentionPlan()


@dataclass(frozen=True)
class Tuning:
    """What was chosen and what each candidate measured (ms per call; NaN: failed or wrong)."""

    plan: AttentionPlan
    timings_ms: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # candidate → why


@contextlib.contextmanager
def _backend(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    with sdpa_kernel([getattr(SDPBackend, name)]):
        yield


def planned_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan = DEFAULT_PLAN
) -> torch.Tensor:
    """Unmasked SDPA as `plan` says: q, k, v (N, H, L, d) → (N, H, L, d), the same values as
    `F.scaled_dot_product_attention(q, k, v)` up to the kernel's rounding."""
    d = q.shape[-1]
    width = plan.head_dim or d
    if width > d:
        q, k, v = (F.pad(t, (0, width - d)) for t in (q, k, v))  # (N, H, L, width)
    with _backend(plan.backend):
        out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d))
    return out[..., :d] if width > d else out


def candidates(head_dim: int, backends: tuple[str | None, ...]) -> list[AttentionPlan]:
    """Each back end at the head's own width and the next two kernel widths above it."""
    widths: list[int | None] = [None, *[w for w in _WIDTHS if w > head_dim][:2]]
    return [AttentionPlan(b, w) for b in (None, *backends) for w in widths]


def choose_plan(
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    backends: tuple[str | None, ...] = CUDA_BACKENDS,
    timer: Timer = cuda_timer,
) -> Tuning:
    """Time every candidate on random q, k, v of `shape` (N, H, L, d) and keep the fastest
    whose output matches the default's; the default plan when none does better."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3)
    )  # (N, H, L, d) each
    reference = F.scaled_dot_product_attention(q, k, v).float()
    magnitude = float(reference.abs().max())
    timings: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for plan in candidates(shape[-1], backends):
        try:
            out = planned_attention(q, k, v, plan)
            error = float((out.float() - reference).abs().max()) / magnitude
            if not error <= _TOLERANCE:  # NaN fails too
                rejected[plan.name] = f"max |Δ| {error:.3g} of the default's largest value"
                continue
            with on_device(device):  # the timer times the current CUDA device
                timings[plan.name] = timer(functools.partial(planned_attention, q, k, v, plan))
        except Exception as exc:  # noqa: BLE001 (a back end that cannot run this shape here)
            rejected[plan.name] = str(exc).split("\n", 1)[0][:200]
    chosen = min(
        (p for p in candidates(shape[-1], backends) if p.name in timings),
        key=lambda p: timings[p.name],
        default=DEFAULT_PLAN,
    )
    return Tuning(chosen, timings, rejected)
