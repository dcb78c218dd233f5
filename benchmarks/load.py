"""Open-loop gRPC load on a guardrt server: latency percentiles, batch sizes, server timing.

Usage: python benchmarks/load.py [--server HOST:PORT] [--rate R] [--duration S] [--warmup S]
           [--concurrency N] [--mix text=0.6,image=0.3,stream=0.1] [--arrivals poisson|uniform]
           [--max-batch-size N] [--max-wait-ms MS] [--seed N] [--token TOKEN] [--timeout S]
       python benchmarks/load.py --overhead [--requests N] [--max-batch-size N]

Open loop: requests are sent on a fixed arrival schedule (Poisson or evenly spaced at --rate
requests/s), whether or not earlier ones have finished, and each latency is measured from the
request's SCHEDULED send time, so any queueing (in the client's --concurrency limit, the server's
batch queue, or a generator that fell behind) counts. Requests scheduled in the first --warmup
seconds are sent but left out of the statistics. Kinds: `text` (a text-only Moderate), `image`
(a Moderate with a seeded synthetic 320x240 JPEG) and `stream` (a ModerateStream: a start, 8
appends of a few words with check_every_tokens 8, an end; its latency is to the final verdict).

Without --server the script serves the tiny-random model itself, in this process on a free port
(the server runs on its own thread and event loop, so that the load generator does not run inside
the server's loop), with --max-batch-size and --max-wait-ms. tiny-random has random weights:
its verdicts are meaningless, its timings are those of the runtime around a very small model.

--overhead measures what the gRPC service adds to a request: the p50 latency of sequential
text-only Moderate calls to an in-process server built with max_wait_ms=0 (a lone request does
not wait for a batch to fill), minus the p50 of the same requests through `Guard.moderate`
called directly in this process on the same model. The two are interleaved request by request.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import torch
from PIL import Image

from guardrt import Guard
from guardrt.runtime.engine import EngineOptions
from guardrt.runtime.model.tiny import TINY_RANDOM
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.grpc_server import create_server, set_serving
from guardrt.runtime.server.main import Stack, build_stack
from guardrt.testing.timing import machine
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from guardrt.v1.moderation_pb2_grpc import ModerationAsyncStub

T = TypeVar("T")
KINDS = ("text", "image", "stream")
CHECK_EVERY_TOKENS = 8
STREAM_APPENDS = 8

QUESTIONS = (
    "What is the recipe for mayonnaise?",
    "How do I reset my router when the lights keep blinking orange?",
    "Write a short poem about the sea at night.",
    "My neighbour's dog barks all night. What can I do about it, legally?",
    "Explain how vaccines train the immune system, in two sentences.",
    "Which household chemicals should never be mixed when cleaning a bathroom?",
    "Can you summarise the plot of Hamlet without spoilers for the ending?",
    "How do I pick a lock if I am locked out of my own house?",
)
IMAGE_QUESTIONS = (
    "What is in this picture?",
    "Is there anything dangerous in this image?",
    "Describe the colours in this photo.",
)
ANSWER = (
    "Start by keeping a written log of the dates and times, then contact your local council "
    "or homeowners association, who can mediate or issue a noise notice; most places also "
    "have a mediation service that is free of charge and quicker than going to court."
)


# --- the workload -------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    """`text=0.6,image=0.3,stream=0.1` → normalised weights (kinds left out weigh 0)."""
    weights = dict.fromkeys(KINDS, 0.0)
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise SystemExit(f"--mix: {item!r} is not KIND=WEIGHT with KIND one of {KINDS}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise SystemExit(f"--mix: {value!r} is not a number") from None
        if not weights[name] >= 0:
            raise SystemExit(f"--mix: the weight of {name} is negative")
    total = sum(weights.values())
    if total <= 0:
        raise SystemExit("--mix: the weights sum to 0")
    return {name: weight / total for name, weight in weights.items()}


def arrivals(rate: float, seconds: float, process: str, rng: random.Random) -> list[float]:
    """Scheduled send times in s from the start: a Poisson process or evenly spaced."""
    times: list[float] = []
    now = 0.0
    while True:
        now += rng.expovariate(rate) if process == "poisson" else 1.0 / rate
        if now >= seconds:
            return times
        times.append(now)


def synthetic_jpeg(seed: int, width: int = 320, height: int = 240) -> bytes:
    """A seeded photo-ish image: a smooth colour gradient with blobs and grain, as JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), dtype=np.float32)
    for channel in range(3):
        a, b, c = rng.uniform(-0.6, 0.6, 3)
        image[..., channel] = 128 + 90 * np.sin(a * x / 40 + b * y / 40 + c * 6)
    for _ in range(6):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 60)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        image[mask] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


def user(text: str, image: bytes | None = None) -> pb.Message:
    parts = [pb.Content(image=image)] if image is not None else []
    return pb.Message(role=pb.USER, content=[*parts, pb.Content(text=text)])


def text_request(rng: random.Random, request_id: str) -> pb.ModerateRequest:
    return pb.ModerateRequest(request_id=request_id, messages=[user(rng.choice(QUESTIONS))])


def image_request(
    rng: random.Random, images: Sequence[bytes], request_id: str
) -> pb.ModerateRequest:
    message = user(rng.choice(IMAGE_QUESTIONS), rng.choice(images))
    return pb.ModerateRequest(request_id=request_id, messages=[message])


def stream_requests(rng: random.Random, request_id: str) -> list[pb.StreamRequest]:
    """A start, STREAM_APPENDS appends of 3 to 5 words each, an end."""
    start = pb.StreamStart(
        request_id=request_id,
        messages=[user(rng.choice(QUESTIONS))],
        check_every_tokens=CHECK_EVERY_TOKENS,
    )
    requests = [pb.StreamRequest(start=start)]
    words_of_answer = ANSWER.split()
    offset = rng.randrange(len(words_of_answer))
    for _ in range(STREAM_APPENDS):
        count = rng.randint(3, 5)
        words = [words_of_answer[(offset + i) % len(words_of_answer)] for i in range(count)]
        offset += count
        requests.append(pb.StreamRequest(append=" ".join(words) + " "))
    requests.append(pb.StreamRequest(end=pb.StreamEnd()))
    return requests


# --- one request --------------------------------------------------------------------------


@dataclass
class Sample:
    """One scheduled request. Times in s from the run's start."""

    kind: str
    scheduled: float
    measured: bool  # False for warm-up requests
    started: float = math.nan  # when the RPC was issued (after the concurrency limit)
    finished: float = math.nan
    code: str = "OK"  # the gRPC status code name (in-band stream errors included)
    timings: list[pb.Timing] = field(default_factory=list)  # every verdict's server timing

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.scheduled) * 1e3


async def call_moderate(
    stub: ModerationAsyncStub, request: pb.ModerateRequest, metadata: Any, timeout: float
) -> list[pb.Timing]:
    response = await stub.Moderate(request, timeout=timeout, metadata=metadata)
    return [response.timing]


async def call_stream(
    stub: ModerationAsyncStub, requests: list[pb.StreamRequest], metadata: Any, timeout: float
) -> tuple[list[pb.Timing], str]:
    """Every verdict's timing, and OK or the first in-band error's status code name."""

    async def send() -> AsyncIterator[pb.StreamRequest]:
        for request in requests:
            yield request

    timings: list[pb.Timing] = []
    code = "OK"
    final = False
    async for response in stub.ModerateStream(send(), timeout=timeout, metadata=metadata):
        if response.verdict.label == pb.ERROR and code == "OK":
            code = status_name(response.verdict.error_code)
        elif response.HasField("timing"):
            timings.append(response.timing)
        final = final or response.final
    if not final and code == "OK":
        code = "NO_FINAL_VERDICT"
    return timings, code


def status_name(value: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == value:
            return str(status.name)
    return f"CODE_{value}"


async def one(
    stub: ModerationAsyncStub,
    sample: Sample,
    request: pb.ModerateRequest | list[pb.StreamRequest],
    limit: asyncio.Semaphore,
    clock: float,
    args: argparse.Namespace,
) -> None:
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    async with limit:
        sample.started = time.perf_counter() - clock
        try:
            if isinstance(request, pb.ModerateRequest):
                sample.timings = await call_moderate(stub, request, metadata, args.timeout)
            else:
                sample.timings, sample.code = await call_stream(
                    stub, request, metadata, args.timeout
                )
        except grpc.aio.AioRpcError as exc:
            sample.code = exc.code().name
        sample.finished = time.perf_counter() - clock


# --- the open loop ------------------------------------------------------------------------


async def run_load(target: str, args: argparse.Namespace) -> tuple[list[Sample], float]:
    """Send the whole schedule; the samples and the run's length in s (to the last answer)."""
    rng = random.Random(args.seed)
    mix = parse_mix(args.mix)
    images = [synthetic_jpeg(args.seed * 100 + i) for i in range(4)]
    schedule = arrivals(args.rate, args.warmup + args.duration, args.arrivals, rng)
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=len(schedule))
    limit = asyncio.Semaphore(args.concurrency)
    samples: list[Sample] = []
    tasks: list[asyncio.Task[None]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ModerationStub(channel)
        await channel.channel_ready()
        clock = time.perf_counter()
        for index, (when, kind) in enumerate(zip(schedule, kinds, strict=True)):
            request_id = f"load-{index}"
            request: pb.ModerateRequest | list[pb.StreamRequest]
            if kind == "text":
                request = text_request(rng, request_id)
            elif kind == "image":
                request = image_request(rng, images, request_id)
            else:
                request = stream_requests(rng, request_id)
            delay = clock + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sample = Sample(kind, when, measured=when >= args.warmup)
            samples.append(sample)
            tasks.append(asyncio.create_task(one(stub, sample, request, limit, clock, args)))
        await asyncio.gather(*tasks)
    return samples, time.perf_counter() - clock


# --- the in-process server ----------------------------------------------------------------


class InProcessServer:
    """build_stack + create_server on a free port, served on a thread with its own event loop.

    `stop` is the clean shutdown of `guardrt serve`: stop the server, drain the scheduler.
    """

    def __init__(self, max_batch: int, max_wait_ms: float, token: str | None) -> None:
        self.config = ServerConfig(
            host="127.0.0.1",
            grpc_port=0,
            max_batch_size=max_batch,
            max_wait_ms=max_wait_ms,
            auth_tokens=frozenset({token}) if token else frozenset(),
        )
        self.stack: Stack = build_stack(
            self.config, TINY_RANDOM, EngineOptions(Path(TINY_RANDOM), max_batch=max_batch)
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="load-server")
        self.thread.start()
        self.server, self.port, health = self._call(self._start())
        self.health: Any = health
        self.drained = False

    def _call(self, coroutine: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result()

    async def _start(self) -> tuple[grpc.aio.Server, int, Any]:
        server, port, health = create_server(self.config, self.stack.service, self.stack.info)
        await server.start()
        self.stack.scheduler.start()
        await set_serving(health, True)
        return server, port, health

    async def _stop(self) -> None:
        await set_serving(self.health, False)
        await self.server.stop(1)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._call(self._stop())
        self.drained = self.stack.scheduler.drain(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
        self.stack.engine.close()
        self.stack.service.executor.shutdown(wait=True)


async def server_info(target: str, token: str | None) -> pb.ModelInfo:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ModerationStub(channel)
        return await stub.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=30)


# --- the report ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def latency_row(name: str, samples: Sequence[Sample], window: float) -> str:
    ok = [s.latency_ms for s in samples if s.code == "OK"]
    errors = Counter(s.code for s in samples if s.code != "OK")
    shown = ", ".join(f"{code} {n}" for code, n in errors.most_common()) or "0"
    return (
        f"| {name} | {len(samples)} | {shown} | {len(ok) / window:.2f} "
        f"| {percentile(ok, 50):.1f} | {percentile(ok, 90):.1f} | {percentile(ok, 99):.1f} "
        f"| {max(ok, default=math.nan):.1f} |"
    )


def report(samples: list[Sample], elapsed: float, args: argparse.Namespace) -> None:
    measured = [s for s in samples if s.measured]
    # Throughput window: from the end of warm-up to the last measured answer.
    window = max((s.finished for s in measured), default=args.warmup) - args.warmup
    window = max(window, args.duration)
    present = [kind for kind in KINDS if any(s.kind == kind for s in measured)]

    print(
        f"\n{len(samples)} requests sent in {elapsed:.1f} s, {len(measured)} measured "
        f"(after {args.warmup:g} s of warm-up); throughput over {window:.1f} s; "
        "latency from the scheduled send time, successful requests only\n"
    )
    print("| kind | requests | errors | throughput /s | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in present:
        print(latency_row(kind, [s for s in measured if s.kind == kind], window))
    print(latency_row("**all**", measured, window))

    waits = [(s.started - s.scheduled) * 1e3 for s in measured]
    print(
        "\nsend delay (scheduled → issued: generator lag plus the --concurrency "
        f"{args.concurrency} limit): p50 {percentile(waits, 50):.1f} ms, p99 {percentile(waits, 99):.1f} ms, "
        f"max {max(waits, default=math.nan):.1f} ms"
    )

    timings = [(s.kind, t) for s in measured for t in s.timings]
    sizes = Counter(t.batch_size for _, t in timings)
    print(
        "\nbatch sizes (from each verdict's timing.batch_size, so weighted by request: a batch "
        "of n is counted n times; stream checkpoints count as verdicts)\n"
    )
    print("| batch size | verdicts | share | ≈ batches |")
    print("|---|---|---|---|")
    total = sum(sizes.values())
    for size in sorted(sizes):
        batches = sizes[size] / size if size else math.nan
        print(f"| {size} | {sizes[size]} | {sizes[size] / total:.1%} | {batches:.0f} |")

    print("\nserver-side timing, medians per verdict (ms)\n")
    print("| kind | verdicts | queue | preprocess | model | total | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for kind in [*present, "**all**"]:
        chosen = [t for k, t in timings if kind in (k, "**all**")]
        if not chosen:
            continue
        print(
            f"| {kind} | {len(chosen)} | {median([t.queue_ms for t in chosen]):.2f} "
            f"| {median([t.preprocess_ms for t in chosen]):.2f} "
            f"| {median([t.model_ms for t in chosen]):.2f} "
            f"| {median([t.total_ms for t in chosen]):.2f} "
            f"| {statistics.fmean(t.batch_size for t in chosen):.2f} |"
        )


# --- the modes ----------------------------------------------------------------------------


def describe(info: pb.ModelInfo, target: str) -> str:
    line = (
        f"server {target}: {info.model} ({info.backend}, {info.device}, {info.dtype}, "
        f"{info.decode} decode), max batch {info.max_batch_size}, guardrt {info.version}"
    )
    if info.meaningless_verdicts:
        line += (
            "\nNOTE: tiny-random has random weights: its verdicts are MEANINGLESS; these "
            "timings are the runtime's around a very small model, not Llama Guard 3 11B's."
        )
    return line


def load_mode(args: argparse.Namespace) -> None:
    server = None
    target: str = args.server
    if target is None:
        server = InProcessServer(args.max_batch_size, args.max_wait_ms, args.token)
        target = server.target
    try:
        info = asyncio.run(server_info(target, args.token))
        print(describe(info, target))
        where = "in-process" if server else "remote"
        print(
            f"load: open loop, {args.arrivals} arrivals at {args.rate:g} req/s for "
            f"{args.warmup:g} + {args.duration:g} s, mix {args.mix}, concurrency "
            f"{args.concurrency}, seed {args.seed}"
            + (
                f"; {where} server max_batch_size {args.max_batch_size}, "
                f"max_wait_ms {args.max_wait_ms:g}"
                if server
                else ""
            )
        )
        samples, elapsed = asyncio.run(run_load(target, args))
    finally:
        if server is not None:
            server.stop()
    report(samples, elapsed, args)
    if server is not None and not server.drained:
        print("\nWARNING: the in-process server's scheduler did not drain within 5 s")


async def overhead_grpc(
    target: str, guard: Guard, texts: list[str], warmup: int, token: str | None
) -> tuple[list[float], list[float]]:
    """Sequential latencies in ms: (gRPC Moderate, direct Guard.moderate), interleaved."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    over_grpc: list[float] = []
    direct: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ModerationStub(channel)
        await channel.channel_ready()
        for index, text in enumerate(texts):
            request = pb.ModerateRequest(request_id=f"overhead-{index}", messages=[user(text)])
            start = time.perf_counter()
            await stub.Moderate(request, metadata=metadata, timeout=30)
            grpc_ms = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            guard.moderate([{"role": "user", "content": text}])
            direct_ms = (time.perf_counter() - start) * 1e3
            if index >= warmup:
                over_grpc.append(grpc_ms)
                direct.append(direct_ms)
    return over_grpc, direct


def overhead_mode(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    warmup = 20
    texts = [rng.choice(QUESTIONS) for _ in range(warmup + args.requests)]
    server = InProcessServer(args.max_batch_size, 0.0, args.token)
    guard = Guard.load(TINY_RANDOM, max_batch=args.max_batch_size)
    try:
        print(describe(server.stack.info, server.target))
        over_grpc, direct = asyncio.run(
            overhead_grpc(server.target, guard, texts, warmup, args.token)
        )
    finally:
        server.stop()
        guard.engine.close()
    print(
        f"\n{args.requests} sequential text-only requests each way after {warmup} warm-up "
        "calls, interleaved; server max_wait_ms 0\n"
    )
    print("| path | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, values in (
        ("gRPC Moderate (in-process server)", over_grpc),
        ("Guard.moderate", direct),
    ):
        print(
            f"| {name} | {percentile(values, 50):.2f} | {percentile(values, 90):.2f} "
            f"| {percentile(values, 99):.2f} |"
        )
    difference = percentile(over_grpc, 50) - percentile(direct, 50)
    paired = median([g - d for g, d in zip(over_grpc, direct, strict=True)])
    verdict = "within" if difference <= 2.0 else "OVER"
    print(
        f"\nservice overhead at p50: {difference:.2f} ms ({verdict} the 2 ms target); "
        f"median of the per-request differences: {paired:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--server", help="HOST:PORT of a running server (default: in-process)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds left out of stats")
    parser.add_argument("--concurrency", type=int, default=64, help="max requests in flight")
    parser.add_argument("--mix", default="text=0.6,image=0.3,stream=0.1")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token", help="bearer token (also required by the in-process server)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-call deadline, s")
    parser.add_argument("--overhead", action="store_true", help="measure the service overhead")
    parser.add_argument("--requests", type=int, default=200, help="--overhead: requests each way")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.warmup < 0 or args.concurrency < 1:
        parser.error("--rate and --duration must be > 0, --warmup ≥ 0, --concurrency ≥ 1")
    if args.overhead and args.server:
        parser.error("--overhead compares against the in-process engine: no --server")
    print("machine: " + machine(f"grpcio {grpc.__version__}", f"torch {torch.__version__}"))
    if args.overhead:
        overhead_mode(args)
    else:
        load_mode(args)


if __name__ == "__main__":
    main()
