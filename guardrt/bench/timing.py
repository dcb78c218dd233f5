"""Wall time of GPU work: synchronize before and after each call, so a call's time is its own."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def times_ms(
    run: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1
) -> list[float]:
    """ms per call of `run`, `repeat` calls after `warmup` untimed ones."""
    times = []
    for index in range(warmup + repeat):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times
