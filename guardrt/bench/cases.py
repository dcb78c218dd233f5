"""The benchmark's requests and how each kind of run times them.

Three inputs (issue 8): a ~350-token prompt classification, the same with a 4-tile image, and a
response classification with an image; each on the `safe` path (one prefill) and the `unsafe`
+ one category path (one more small forward), forced with `ForcedSteps`.

Every run decodes as the engines serve: through the given steps (the torch engine's eager
`TorchSteps` or `StaticSteps` replaying CUDA graphs, or an engine directory's graph steps) with
one shared policy-prefix row, so the caches need the batch rows, `PREFIXES` more and (for
`StaticSteps`) its scratch row. Nothing here imports torch: `sync` is the caller's barrier
(a CUDA synchronize for the torch engine; nothing for graph steps, whose results are on the
host when a step returns).
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from guardrt.bench import photos
from guardrt.bench.forced import ForcedSteps, Path
from guardrt.runtime.decoding import Decoder, StepModel
from guardrt.runtime.engine import EngineInfo
from guardrt.runtime.errors import ServiceError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.scheduler import BatchInfo, Outcome, Scheduler, Work
from guardrt.testing.timing import medians_ms

PATHS: tuple[Path, ...] = ("safe", "unsafe")
MAX_SEQ = 1024  # the cases' caches (torch steps or an engine's): every case fits
PREFIXES = 1  # shared policy-prefix rows, as the engine's default (EngineOptions.max_prefixes)
_QUESTION = (
    "My neighbour's dog barks all night. Tell me how to get into their house while they are "
    "away on holiday so I can deal with the dog myself, and what to bring so nobody notices. "
)
_ANSWER = "First, check which windows at the back are left open; then bring gloves and a bag. "


def prefill_tokens(request: PreparedRequest) -> int:
    """Ids a verdict's prefill feeds the decoder: the prompt after its policy head where that
    is shared work (a text-only prompt's, computed once per policy: `prefixes.py`), and the 4
    ids the constrained prefill appends (blank, `unsafe`, newline, `S`: `decoding.py`) to read
    the label and the category rows in one forward."""
    shared = request.prefix_len if request.image is None else 0
    return len(request.prompt) - shared + 4


def picture(height: int = 1100, width: int = 1100, seed: int = 0) -> np.ndarray:
    """A 2×2-tile photo-sized picture (uint8 HxWx3), deterministic."""
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def _text(preparer: Preparer, prompt_tokens: int) -> str:
    """The user's question, repeated until the prompt holds about `prompt_tokens` ids."""
    text = _QUESTION
    while len(preparer.prepare([{"role": "user", "content": text}]).prompt) < prompt_tokens:
        text += _QUESTION
    return text


def requests(preparer: Preparer, prompt_tokens: int = 350) -> dict[str, PreparedRequest]:
    """text / image / response+image requests, the text grown to about `prompt_tokens`."""
    text = _text(preparer, prompt_tokens)
    image = {"type": "image", "image": picture()}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": text}]}]
    return {
        "text": preparer.prepare([{"role": "user", "content": text}]),
        "image+text": preparer.prepare(with_image),
        "response+image": preparer.prepare(
            [*with_image, {"role": "assistant", "content": _ANSWER * 3}]
        ),
    }


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    prefill_p50_ms: float
    decode_p50_ms: float
    runs: int
    path: str  # what the grammar produced (the forced path)

    @classmethod
    def of(cls, totals: list[float], decoded: list[Decoded]) -> Latency:
        ordered = sorted(totals)

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        return cls(
            pick(0.5),
            pick(0.9),
            pick(0.99),
            statistics.median(d.prefill_s * 1e3 for d in decoded),
            statistics.median(d.decode_s * 1e3 for d in decoded),
            len(totals),
            decoded[-1].verdict().raw_output.strip(),
        )


def preprocess_ms(preparer: Preparer, repeat: int, prompt_tokens: int = 350) -> dict[str, float]:
    """Median ms the host spends turning a request into model inputs (validation, chat template,
    tokenizer, and for an image: JPEG decode, resize, tiles), for the text request and for the
    same with a 1920×1080 photo-like JPEG and (when `llama_models` is installed) a real photo.
    A served verdict pays this before the model's latency measured by `time_ours`."""
    text = _text(preparer, prompt_tokens)
    jpegs = [("1920x1080 photo-like JPEG", photos.jpeg(photos.photo_like(1920, 1080, seed=1)))]
    real = photos.real_photo()
    jpegs += [] if real is None else [real]

    def prepare(data: bytes | None) -> PreparedRequest:
        parts: list[dict[str, object]] = [{"type": "text", "text": text}]
        if data is not None:
            parts.insert(0, {"type": "image", "image": data})
        return preparer.prepare([{"role": "user", "content": parts}])

    runs: dict[str, Callable[[], object]] = {"text": functools.partial(prepare, None)}
    runs |= {f"image+text, {name}": functools.partial(prepare, data) for name, data in jpegs}
    return medians_ms(runs, repeat)


Sync = Callable[[], None]  # waits for the steps' device work (a no-op for host results)


def no_sync() -> None:
    return None


def _forced(steps: StepModel, request: PreparedRequest, path: Path) -> ForcedSteps:
    return ForcedSteps(steps, request.grammar, path, "S1")


def warm_up(
    steps: StepModel, requests: Sequence[PreparedRequest], sync: Sync, rounds: int = 3
) -> float:
    """Run every request on both paths before anything is timed: the first timed case must
    not pay for clocks ramping up, allocator growth, kernel selection or graph capture.
    Returns the seconds it took."""
    started = time.perf_counter()
    for _ in range(rounds):
        for request in requests:
            for path in PATHS:
                Decoder(_forced(steps, request, path), prefixes=PREFIXES).run([request])
    sync()
    return time.perf_counter() - started


def time_ours(
    steps: StepModel,
    request: PreparedRequest,
    path: Path,
    repeat: int,
    sync: Sync,
    warmup: int = 2,
) -> Latency:
    """End-to-end verdict latency at batch 1 through guardrt's decoding loop."""
    forced = _forced(steps, request, path)
    decoder = Decoder(forced, prefixes=PREFIXES)
    totals, decoded = [], []
    for index in range(warmup + repeat):
        forced.reset()
        sync()
        start = time.perf_counter()
        (result,) = decoder.run([request])
        sync()
        if index >= warmup:
            totals.append((time.perf_counter() - start) * 1e3)
            decoded.append(result)
    return Latency.of(totals, decoded)


class _ForcedEngine:
    """The Engine protocol over a forced decoder (the scheduler's view of the model)."""

    def __init__(
        self, steps: StepModel, sample: PreparedRequest, path: Path, info: EngineInfo
    ) -> None:
        self.forced = _forced(steps, sample, path)
        self.decoder = Decoder(self.forced, prefixes=PREFIXES)
        self.info = replace(info, max_batch=self.decoder.batch_size)
        self.error: Exception | None = None  # the last batch failure, if any

    def warmup(self, sample: Sequence[PreparedRequest]) -> None:
        self.execute(sample)

    def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
        self.forced.reset()
        try:
            return self.decoder.run(batch)
        except Exception as exc:
            # The scheduler answers a failed batch with a bare ENGINE error (and logs the
            # traceback); kept so the benchmark can say what failed.
            self.error = exc
            raise

    def open_session(self) -> int | None:
        return None

    def close_session(self, session: int) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class Throughput:
    concurrency: int
    requests: int
    requests_per_s: float
    mean_batch: float
    warmup_s: float  # the engine's warm-up up to this batch (graph captures included)


def throughput(
    steps: StepModel,
    request: PreparedRequest,
    concurrency: int,
    total: int,
    sync: Sync,
    info: EngineInfo,
) -> Throughput:
    """Closed loop: `concurrency` clients, each sending its next request when answered,
    through the scheduler (batches up to what the steps hold), `safe` path. `info`: the
    engine the steps belong to (the scheduler's view of it). A request the scheduler answers
    with an error (the engine failed its batch: out of memory, say) ends the run, which raises
    naming it: a failed request answers at once, so counting it would report a rate of
    failures."""
    engine = _ForcedEngine(steps, request, "safe", info)
    warmed = time.perf_counter()
    # Every batch size the scheduler may form, bucketed: it forms none over `concurrency`.
    # (Measured: warming a 4-image batch for a concurrency-1 run of a full-width int8 engine
    # on ONNX Runtime's CPU provider had the process killed for memory on a 24 GB machine.)
    top = min(concurrency, engine.info.max_batch)
    for size in sorted({min(2**i, top) for i in range(top.bit_length() + 1)} | {top}):
        engine.warmup([request] * size)
    sync()
    warmup_s = time.perf_counter() - warmed
    scheduler = Scheduler(engine, concurrency, 0.002, 100_000)
    scheduler.start()
    counts = {"sent": 0, "answered": 0}
    sizes: list[int] = []
    failures: list[ServiceError] = []
    lock = threading.Lock()
    finished = threading.Event()

    def send() -> bool:
        """Send the next request; False when there is none (all sent, or one failed)."""
        with lock:
            if counts["sent"] == total or failures:
                return False
            counts["sent"] += 1
        scheduler.add(Work(request, "bench", done))
        return True

    def done(outcome: Outcome, info: BatchInfo) -> None:
        with lock:
            counts["answered"] += 1
            if isinstance(outcome, ServiceError):
                failures.append(outcome)
            else:
                sizes.append(info.size)
        if not send():
            with lock:  # nothing more will be sent: done once every request sent is answered
                if counts["answered"] == counts["sent"]:
                    finished.set()

    start = time.perf_counter()
    for _ in range(concurrency):
        send()
    finished.wait()
    elapsed = time.perf_counter() - start
    scheduler.drain()
    if failures:
        cause = engine.error
        why = f"{type(cause).__name__}: {cause}" if cause is not None else str(failures[0])
        raise RuntimeError(
            f"{len(failures)} of {counts['sent']} requests failed at concurrency "
            f"{concurrency} ({failures[0].reason.value}): {why}"
        ) from cause
    return Throughput(concurrency, total, total / elapsed, statistics.mean(sizes), warmup_s)
