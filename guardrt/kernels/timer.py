"""Milliseconds per call of GPU work, for the choices the runtime makes by measuring at load.

What is timed must be what a served step pays, or the choice is made on the wrong numbers:
- Served steps replay CUDA graphs, so Python and launch costs are not theirs. A µs-scale kernel
  timed by wall clock around eager calls measures its launch (a Triton launch from Python costs
  more than the kernel of a decode step), so the calls are captured into a graph and replayed.
- A step reads each layer's weights once, from memory; called again and again, a 16 MB weight
  sits in the H100's 50 MB L2 and reads at L2 speed. So every call is preceded by a read of a
  buffer twice the L2's size, and those flushes, timed alone the same way, are subtracted.
Work that cannot be captured is timed eagerly with events instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

Timer = Callable[[Callable[[], object]], float]

_DEFAULT_L2_BYTES = 50 << 20  # an H100's, where the device does not say
_REPLAYS = 3  # graph replays averaged


def _flusher(device: torch.device) -> Callable[[], object]:
    """A read of twice the L2's bytes: evicts what the previous call left there, and leaves
    only clean lines (a write would leave dirty lines for the timed call to write back)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    buffer = torch.ones(2 * (l2 or _DEFAULT_L2_BYTES) // 4, device=device)  # fp32
    return functools.partial(torch.sum, buffer)


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def _graph_ms(run: Callable[[], object], reps: int) -> float:
    """ms for `reps` calls of `run` captured in one CUDA graph (after one warm replay)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(reps):
            run()
    graph.replay()
    start, end = _events()
    start.record()
    for _ in range(_REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / _REPLAYS


def _eager_ms(run: Callable[[], object], reps: int) -> float:
    start, end = _events()
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def cuda_timer(fn: Callable[[], object], reps: int = 10) -> float:
    """Milliseconds per call of `fn` on the current CUDA device, as a replayed step runs it:
    from memory, not L2, without launch costs. Two eager calls first (the first compiles a
    Triton kernel or picks a cuBLAS algorithm, neither of which a graph may capture)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    flush = _flusher(torch.device("cuda", torch.cuda.current_device()))

    def flushed() -> None:
        flush()
        fn()

    try:
        total, flushes = _graph_ms(flushed, reps), _graph_ms(flush, reps)
    except RuntimeError:  # not capturable (it reads the device back, say): eager, with events
        total, flushes = _eager_ms(flushed, reps), _eager_ms(flush, reps)
    return max(total - flushes, 0.0) / reps
