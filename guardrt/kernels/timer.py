"""Milliseconds per call of GPU work, for the choices the runtime makes by measuring at load."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

Timer = Callable[[Callable[[], object]], float]


def cuda_timer(fn: Callable[[], object], reps: int = 5) -> float:
    """Milliseconds per call of `fn` on the current CUDA device, after two warm-up calls (the
    first compiles a Triton kernel or picks a cuBLAS algorithm)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / reps
