"""What the installed torch can do on the CPU, for tests that need more than CI's pin requires.

CI pins torch 2.13, where all of these hold. The GPU machine has torch 2.11, whose CPU
`_scaled_mm` takes per-tensor scales only ("Now _scaled_mm only supports per-tensor scaling for
CPU backend"): the tests that run the fp8 fast path's rowwise `_scaled_mm` on CPU tensors say
so and skip there, rather than fail in the GPU run's output (its CUDA `_scaled_mm` does take
rowwise scales; the GPU tests and benchmarks run that)."""

from __future__ import annotations

import functools

import pytest
import torch


@functools.cache
def cpu_rowwise_scaled_mm() -> bool:
    """Whether `torch._scaled_mm` runs on CPU tensors with rowwise (per-row, per-column) scales."""
    a = torch.ones(16, 32).to(torch.float8_e4m3fn)
    b = torch.ones(16, 32).to(torch.float8_e4m3fn).t()
    try:
        torch._scaled_mm(
            a, b, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16
        )
    except RuntimeError:
        return False
    return True


def need_cpu_rowwise_scaled_mm() -> None:
    """Skip the calling test, saying why, where the CPU `_scaled_mm` lacks rowwise scales."""
    if not cpu_rowwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only")
