"""Open-loop gRPC load on a guardrt server: latency percentiles, batch sizes, server timing.

Usage: python benchmarks/load.py [--server HOST:PORT] [--rate R] [--duration S] [--warmup S]
           [--concurrency N] [--mix text=0.6,image=0.3,stream=0.1] [--arrivals poisson|uniform]
           [--max-batch-size N] [--max-wait-ms MS] [--batching cost|fifo] [--seed N]
           [--token TOKEN] [--timeout S]
       python benchmarks/load.py --overhead [--requests N] [--max-batch-size N]

Open loop: requests are sent on a fixed arrival schedule (Poisson or evenly spaced at --rate
requests/s), whether or not earlier ones have finished, and each latency is measured from the
request's SCHEDULED send time, so any queueing (in the client's --concurrency limit, the server's
batch queue, or a generator that fell behind) counts. Requests scheduled in the first --warmup
seconds are sent but left out of the statistics. Kinds: `text` (a text-only Moderate), `long`
(a text-only Moderate of ~700 words), `image` (a Moderate with a seeded synthetic 320x240
JPEG) and `stream` (a ModerateStream: a start, 8 appends of a few words with
check_every_tokens 8, an end; its latency is to the final verdict).

Without --server the script serves the tiny-random model itself, in this process on a free port
(the server runs on its own thread and event loop, so that the load generator does not run inside
the server's loop), with --max-batch-size and --max-wait-ms. tiny-random has random weights:
its verdicts are meaningless, its timings are those of the runtime around a very small model.

--overhead measures what the gRPC service adds to a request: the p50 latency of sequential
text-only Moderate calls to an in-process server built with max_wait_ms=0 (a lone request does
not wait for a batch to fill), minus the p50 of the same requests through `Guard.moderate`
called directly in this process on the same model (one prompt throughout), interleaved request
by request, and where the gRPC path's time goes by the server's own timing.
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
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import torch
from PIL import Image

from guardrt import Guard
from guardrt.runtime.model.resolve import TINY_RANDOM
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.grpc_server import set_serving
from guardrt.runtime.server.main import Stack, build_stack, create_server, health_of
from guardrt.testing.timing import machine
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from guardrt.v1.moderation_pb2_grpc import ModerationAsyncStub

T = TypeVar("T")
KINDS = ("text", "long", "image", "stream")
CHECK_EVERY_TOKENS = 8
CONNECT_TIMEOUT_S = 10.0
WRITE_RACE = "INTERNAL_WRITE_RACE"
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
OVERHEAD_QUESTION = QUESTIONS[1]
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


def long_request(rng: random.Random, request_id: str) -> pb.ModerateRequest:
    """A text-only Moderate of ~700 words: several questions with a pasted document."""
    words = " ".join(rng.choice(QUESTIONS) for _ in range(50))
    return pb.ModerateRequest(request_id=request_id, messages=[user(words)])


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
    reuse: list[tuple[int, int]] = field(default_factory=list)  # stream: (prompt, reused) tokens

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.scheduled) * 1e3


async def call_moderate(
    stub: ModerationAsyncStub, request: pb.ModerateRequest, metadata: Any, timeout: float
) -> list[pb.Timing]:
    response = await stub.Moderate(request, timeout=timeout, metadata=metadata)
    return [response.timing]


async def call_stream(
    stub: ModerationAsyncStub,
    requests: list[pb.StreamRequest],
    metadata: Any,
    timeout: float,
    sample: Sample,
) -> None:
    """Every verdict's timing and K/V reuse into `sample`; its code is the first in-band
    error's (a stream goes on after one)."""

    async def send() -> AsyncIterator[pb.StreamRequest]:
        for request in requests:
            yield request

    final = False
    async for response in stub.ModerateStream(send(), timeout=timeout, metadata=metadata):
        if response.verdict.label == pb.ERROR:
            if sample.code == "OK":
                sample.code = status_name(response.verdict.error_code)
        elif response.HasField("timing"):
            sample.timings.append(response.timing)
            sample.reuse.append((response.prompt_tokens, response.reused_tokens))
        final = final or response.final
    if not final and sample.code == "OK":
        sample.code = "NO_FINAL_VERDICT"


def error_name(exc: grpc.aio.AioRpcError) -> str:
    """The status code's name; WRITE_RACE where grpcio's asyncio client replaced the server's
    status by INTERNAL because a request was still being written as the server ended the call
    (grpc/grpc#36066: the server's real code, e.g. UNAUTHENTICATED, is lost)."""
    if exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in exc.debug_error_string():
        return WRITE_RACE
    return str(exc.code().name)


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
                await call_stream(stub, request, metadata, args.timeout, sample)
        except grpc.aio.AioRpcError as exc:
            sample.code = error_name(exc)
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
        await connect(channel, target)
        clock = time.perf_counter()
        for index, (when, kind) in enumerate(zip(schedule, kinds, strict=True)):
            request_id = f"load-{index}"
            request: pb.ModerateRequest | list[pb.StreamRequest]
            if kind == "text":
                request = text_request(rng, request_id)
            elif kind == "long":
                request = long_request(rng, request_id)
            elif kind == "image":
                request = image_request(rng, images, request_id)
            else:
                request = stream_requests(rng, request_id)
            # Behind schedule, sleep(0) still lets the requests already sent run.
            await asyncio.sleep(max(0.0, clock + when - time.perf_counter()))
            sample = Sample(kind, when, measured=when >= args.warmup)
            samples.append(sample)
            tasks.append(asyncio.create_task(one(stub, sample, request, limit, clock, args)))
        await asyncio.gather(*tasks)
    return samples, time.perf_counter() - clock


# --- the in-process server ----------------------------------------------------------------


class InProcessServer:
    """build_stack + create_server on a free port, served on a thread with its own event loop.

    `stop` is the clean shutdown of `guardrt serve`: NOT_SERVING, stop the server (1 s grace),
    drain the scheduler (5 s).
    """

    def __init__(
        self, max_batch: int, max_wait_ms: float, token: str | None, batching: str = "cost"
    ) -> None:
        self.config = ServerConfig(
            model=TINY_RANDOM,
            host="127.0.0.1",
            grpc_port=0,
            max_batch_size=max_batch,
            max_wait_ms=max_wait_ms,
            batching=batching,
            auth_tokens=frozenset({token}) if token else frozenset(),
        )
        self.stack: Stack = build_stack(self.config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="load-server", daemon=True
        )
        self.thread.start()
        self.server, self.port = self._call(self._start())
        self.drained = False

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server, port = create_server(self.config, self.stack)  # starts the scheduler
        await server.start()
        await set_serving(health_of(server), True)
        return server, port

    async def _stop(self) -> None:
        await set_serving(health_of(self.server), False)
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


async def connect(channel: grpc.aio.Channel, target: str) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise SystemExit(f"no gRPC server answered at {target} in {CONNECT_TIMEOUT_S} s") from None


async def server_info(target: str, token: str | None) -> pb.ModelInfo | str:
    """The server's ModelInfo, or why GetInfo failed."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(target) as channel:
        await connect(channel, target)
        stub = pb_grpc.ModerationStub(channel)
        try:
            return await stub.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"


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
    shown_ms = [fmt(percentile(ok, q)) for q in (50, 90, 99)] + [fmt(max(ok, default=math.nan))]
    return (
        f"| {name} | {len(samples)} | {shown} | {len(ok) / window:.2f} | {' | '.join(shown_ms)} |"
    )


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


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

    if any(s.code == WRITE_RACE for s in measured):
        print(
            f"\n{WRITE_RACE}: the server ended a ModerateStream while the client was still "
            "writing to it, and grpcio's asyncio client reported INTERNAL instead of the "
            "server's status (grpc/grpc#36066); the server's code is unknown."
        )

    waits = [(s.started - s.scheduled) * 1e3 for s in measured]
    print(
        "\nsend delay (scheduled → issued: generator lag plus the --concurrency "
        f"{args.concurrency} limit): p50 {percentile(waits, 50):.1f} ms, "
        f"p99 {percentile(waits, 99):.1f} ms, max {max(waits, default=math.nan):.1f} ms"
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

    streams = [s for s in measured if s.kind == "stream" and s.code == "OK"]
    if streams:
        reuse = [pair for s in streams for pair in s.reuse]
        prompt, reused = sum(p for p, _ in reuse), sum(r for _, r in reuse)
        print(
            f"\nstreams: {len(reuse) / len(streams):.1f} verdicts per stream (checkpoints every "
            f"{CHECK_EVERY_TOKENS} answer tokens, and the final); K/V kept from the previous "
            f"check for {reused} of {prompt} prompt tokens ({reused / max(prompt, 1):.0%})"
        )

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


def describe(info: pb.ModelInfo | str, target: str) -> str:
    if isinstance(info, str):
        return f"server {target}: GetInfo failed ({info}); the model is unknown"
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
        server = InProcessServer(args.max_batch_size, args.max_wait_ms, args.token, args.batching)
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
                f"max_wait_ms {args.max_wait_ms:g}, batching {args.batching}"
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
) -> tuple[list[float], list[float], list[pb.Timing]]:
    """Sequential latencies in ms (gRPC Moderate, direct Guard.moderate; interleaved) and
    the gRPC responses' server-side timings."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    over_grpc: list[float] = []
    direct: list[float] = []
    timings: list[pb.Timing] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ModerationStub(channel)
        await connect(channel, target)
        for index, text in enumerate(texts):
            request = pb.ModerateRequest(request_id=f"overhead-{index}", messages=[user(text)])
            start = time.perf_counter()
            response = await stub.Moderate(request, metadata=metadata, timeout=30)
            grpc_ms = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            guard.moderate([{"role": "user", "content": text}])
            direct_ms = (time.perf_counter() - start) * 1e3
            if index >= warmup:
                over_grpc.append(grpc_ms)
                direct.append(direct_ms)
                timings.append(response.timing)
    return over_grpc, direct, timings


def overhead_mode(args: argparse.Namespace) -> None:
    # One prompt throughout: with prompts of different lengths the two p50s could fall on
    # different lengths' clusters, and their difference would be noise.
    warmup = 20
    texts = [OVERHEAD_QUESTION] * (warmup + args.requests)
    server = InProcessServer(args.max_batch_size, 0.0, args.token)
    guard = Guard.load(TINY_RANDOM, max_batch=args.max_batch_size)
    try:
        print(describe(server.stack.info, server.target))
        over_grpc, direct, timings = asyncio.run(
            overhead_grpc(server.target, guard, texts, warmup, args.token)
        )
    finally:
        server.stop()
        guard.engine.close()
    print(
        f"\n{args.requests} sequential text-only requests each way after {warmup} warm-up "
        f"calls, interleaved; server max_wait_ms 0; the prompt: {OVERHEAD_QUESTION!r}\n"
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
    total = median([t.total_ms for t in timings])
    print(
        f"server-side medians over gRPC (ms): queue {median([t.queue_ms for t in timings]):.2f}, "
        f"preprocess {median([t.preprocess_ms for t in timings]):.2f}, "
        f"model {median([t.model_ms for t in timings]):.2f}, total {total:.2f}; "
        f"client p50 minus server total p50: {percentile(over_grpc, 50) - total:.2f} "
        "(transport, protobuf, servicer)"
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
    parser.add_argument("--batching", choices=("cost", "fifo"), default="cost")
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
    libraries = (f"grpcio {grpc.__version__}", f"torch {torch.__version__}")
    print("machine: " + machine(*libraries), flush=True)
    if args.overhead:
        overhead_mode(args)
    else:
        load_mode(args)


if __name__ == "__main__":
    main()
