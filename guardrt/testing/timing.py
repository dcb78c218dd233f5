"""Timing and machine description shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def medians_ms(
    runs: dict[str, Callable[[], object]], repeat: int, inner: int = 1
) -> dict[str, float]:
    """Median wall time of one call of each callable in ms, runs interleaved after one warm-up.

    Each sample times `inner` back-to-back calls (for calls too short to time singly).
    """
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(inner):
                run()
            samples[name].append((time.perf_counter() - start) * 1e3 / inner)
    return {name: statistics.median(values[1:]) for name, values in samples.items()}


def machine(*libraries: str) -> str:
    """CPU model and core count, Python version, and the given `name version` strings."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return ", ".join(
        (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}", *libraries)
    )
