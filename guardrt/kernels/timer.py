"""Milliseconds per call of GPU work, for the choices the runtime makes by measuring at load.

What is timed must be what a served step pays, or the choice is made on the wrong numbers:
- Served steps replay CUDA graphs, so Python and launch costs are not theirs. A µs-scale kernel
  timed by wall clock around eager calls measures its launch (a Triton launch from Python costs
  more than the kernel of a decode step). So the GPU is held in a sleep kernel while every call
  is queued, and CUDA events time the queue running on the GPU alone. (Not a captured graph: in
  torch 2.11 a capture that fails leaves the caching allocator believing a capture is still
  under way, which breaks every later capture and `empty_cache` of the process.)
- A step reads each layer's weights once, from memory; called again and again, a 16 MB weight
  sits in the H100's 50 MB L2 and reads at L2 speed. So every call is preceded by a read of a
  buffer twice the L2's size, and those flushes, timed alone the same way, are subtracted.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

Timer = Callable[[Callable[[], object]], float]

_DEFAULT_L2_BYTES = 50 << 20  # an H100's, where the device does not say
# GPU cycles the sleep kernel holds the queue for: ~5 ms at 2 GHz, longer than Python takes to
# queue 10 calls and their flushes. (Were the queue to run dry, launch costs would show in the
# time, as they did without the sleep: the measure degrades, it does not fail.)
_HOLD_CYCLES = 10_000_000


def _flusher(device: torch.device) -> Callable[[], object]:
    """A read of twice the L2's bytes: evicts what the previous call left there, and leaves
    only clean lines (a write would leave dirty lines for the timed call to write back)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    buffer = torch.ones(2 * (l2 or _DEFAULT_L2_BYTES) // 4, device=device)  # fp32
    return functools.partial(torch.sum, buffer)


def _queued_ms(run: Callable[[], object], reps: int) -> float:
    """GPU ms of `reps` calls of `run`, queued behind a sleep kernel so that the GPU runs them
    back to back, without waiting for Python to launch each."""
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    torch.cuda._sleep(_HOLD_CYCLES)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def cuda_timer(fn: Callable[[], object], reps: int = 10) -> float:
    """Milliseconds per call of `fn` on the current CUDA device (the caller enters the work's
    device), as a replayed step runs it: from memory, not L2, without launch costs. Two calls
    first (the first compiles a Triton kernel or picks a cuBLAS algorithm)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    flush = _flusher(torch.device("cuda", torch.cuda.current_device()))

    def flushed() -> None:
        flush()
        fn()

    total, flushes = _queued_ms(flushed, reps), _queued_ms(flush, reps)
    return max(total - flushes, 0.0) / reps


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """`device` as the current CUDA device, where `cuda_timer` times (a no-op elsewhere): a
    model on cuda:1 is timed on cuda:1."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
