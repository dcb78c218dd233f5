"""Interactive latency beside a bulk backlog: what `priority: BULK` buys live traffic.

Usage: python benchmarks/priority.py [--server HOST:PORT] [--rate R] [--duration S]
           [--backlog N] [--max-batch-size N] [--max-wait-ms MS] [--seed N]

Three runs against one server (in this process, tiny-random, unless --server): interactive
text-only Moderate calls at --rate per second for --duration seconds, (1) alone, (2) while one
ModerateMany stream pushes --backlog long (~700-word) requests sent as INTERACTIVE, and (3) the
same backlog sent as BULK. Each interactive call's latency is measured from its scheduled send
time (open loop). The table gives the interactive percentiles and how many backlog requests
were answered per second meanwhile: with BULK, live calls should wait for at most the batch on
the engine, not for the backlog's queued batches. tiny-random has random weights: its verdicts
are meaningless, its timings are the runtime's around a very small model.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from benchmarks.load import (
    InProcessServer,
    connect,
    fmt,
    long_request,
    percentile,
    text_request,
)
from guardrt.testing.timing import machine
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from guardrt.v1.moderation_pb2_grpc import ModerationAsyncStub


async def interactive(
    stub: ModerationAsyncStub, rate: float, duration: float, rng: random.Random
) -> tuple[list[float], int]:
    """Evenly spaced text Moderates: their latencies (ms, from the scheduled send) and how many
    failed."""
    latencies: list[float] = []
    failed = 0
    start = time.monotonic() + 0.2

    async def one(index: int) -> None:
        nonlocal failed
        scheduled = start + index / rate
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        try:
            await stub.Moderate(text_request(rng, f"live-{index}"), timeout=60)
            latencies.append((time.monotonic() - scheduled) * 1e3)
        except grpc.aio.AioRpcError:
            failed += 1

    await asyncio.gather(*(one(i) for i in range(int(rate * duration))))
    return latencies, failed


async def backlog(
    stub: ModerationAsyncStub, count: int, bulk: bool, stop: asyncio.Event, rng: random.Random
) -> tuple[int, float]:
    """One ModerateMany of `count` long requests (until `stop`): answers and seconds."""
    priority = pb.BULK if bulk else pb.INTERACTIVE

    async def requests() -> AsyncIterator[pb.ModerateRequest]:
        for index in range(count):
            if stop.is_set():
                return
            request = long_request(rng, f"backlog-{index}")
            request.priority = priority
            yield request

    started = time.monotonic()
    answered = 0
    call = stub.ModerateMany(requests(), timeout=600)
    async for response in call:
        answered += response.verdict.label != pb.ERROR
        if stop.is_set():
            call.cancel()
            break
    return answered, time.monotonic() - started


async def measure(target: str, args: argparse.Namespace) -> list[str]:
    rows = []
    async with grpc.aio.insecure_channel(target) as channel:
        await connect(channel, target)
        stub: Any = pb_grpc.ModerationStub(channel)
        await interactive(stub, args.rate, 1.0, random.Random(args.seed))  # warm-up
        for name, bulk in (("alone", None), ("interactive", False), ("BULK", True)):
            rng = random.Random(args.seed)
            stop = asyncio.Event()
            pushing = None
            if bulk is not None:
                pushing = asyncio.ensure_future(backlog(stub, args.backlog, bulk, stop, rng))
                await asyncio.sleep(1.0)  # the backlog fills the queue first
            latencies, failed = await interactive(stub, args.rate, args.duration, rng)
            stop.set()
            answered, seconds = (await pushing) if pushing is not None else (0, 1.0)
            shown = [fmt(percentile(latencies, q)) for q in (50, 90, 99)]
            backlog_rate = "-" if bulk is None else f"{answered / seconds:.1f}"
            rows.append(
                f"| {name} | {len(latencies)} | {failed} | {' | '.join(shown)} | {backlog_rate} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="HOST:PORT of a running server (default: in-process)")
    parser.add_argument("--rate", type=float, default=10.0, help="interactive calls per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--backlog", type=int, default=5000, help="backlog requests at most")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = None
    if args.server is None:
        server = InProcessServer(args.max_batch_size, args.max_wait_ms, None)
    target = args.server or server.target  # type: ignore[union-attr]
    try:
        rows = asyncio.run(measure(target, args))
    finally:
        if server is not None:
            server.stop()
    where = "in-process tiny-random (meaningless verdicts)" if server else target
    print(
        f"{machine()}; {where}; interactive text calls at {args.rate:g}/s for "
        f"{args.duration:g} s beside a ModerateMany backlog of long requests"
    )
    print("| backlog sent as | calls | failed | p50 ms | p90 ms | p99 ms | backlog answered/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
