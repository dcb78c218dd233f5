"""Dynamic batching across every RPC: a bounded queue, one engine thread, per-request outcomes.

The contract is narrow (as vLLM's): `add` work, `schedule` a batch, `execute` it on the engine,
`update` each request with its outcome. A batch closes when it is full or when its first request
has waited `max_wait`; which queued requests share it is the policy's call (`batching.choose`:
the oldest always, others where batching saves work; or first in, first out). Requests whose
deadline passed are answered DEADLINE without running; cancelled requests are dropped; an
engine failure on a batch of several runs each of its requests again alone, so it fails only
the requests that fail alone. If the engine is then found broken, or the engine thread itself
fails, every waiting request is answered BROKEN and new work refused: no call waits forever.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from guardrt.runtime.batching import Policy, Shape, choose
from guardrt.runtime.engine import Engine
from guardrt.runtime.errors import ServiceError, ServiceReason
from guardrt.runtime.requests import Decoded, PreparedRequest

log = logging.getLogger("guardrt.scheduler")


@dataclass(frozen=True)
class BatchInfo:
    size: int  # requests in the batch
    queue_s: float  # how long this request waited
    model_s: float  # the batch's engine time


Outcome = Decoded | ServiceError
Callback = Callable[[Outcome, BatchInfo], None]


@dataclass(eq=False)
class Work:
    """One request waiting for the engine. `done` is called exactly once, on the engine
    thread (or at once on refusal), unless the work was cancelled first."""

    request: PreparedRequest
    request_id: str
    done: Callback
    deadline: float | None = None  # time.monotonic() after which it must not run
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    answered: bool = False  # `done` was called (or would have been, had it not been cancelled)
    bulk: bool = False  # a backlog's: runs after the interactive work queued
    shape: Shape = field(init=False)  # what batching it costs

    def __post_init__(self) -> None:
        self.shape = Shape.of(self.request, self.bulk)


def broken_error() -> ServiceError:
    """What work gets once the engine is broken (`Scheduler.broken`)."""
    return ServiceError(
        ServiceReason.BROKEN,
        "the engine failed its self-check after an error; this server takes no more work "
        "(it needs a restart): retry on another",
    )


_ANSWERING = threading.Lock()  # makes a work's answer once-only across threads

# Queued requests `batching.choose` looks at for each batch: the oldest few batches' worth.
_WINDOW_BATCHES = 4
# The self-check probe runs at most this often after it passed: requests that each fail alone
# (say, prompts too long for the GPU's memory left) then cost no more than one probe a second,
# and a broken engine is still found at the first failure a second after the last probe.
PROBE_INTERVAL_S = 1.0


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        policy: Policy = choose,
        probe: PreparedRequest | None = None,
        stall_s: float | None = None,
    ) -> None:
        """`probe`: a request the engine ran at warm-up, run again after a request fails
        alone, to tell a broken engine from a request it cannot run (`broken`). `stall_s`: a
        batch running longer than this is taken for a stuck engine (a GPU hang): its requests
        and the queue are answered BROKEN (None: never)."""
        self.engine, self.policy, self.probe = engine, policy, probe
        self.stall_s = stall_s
        self._running: list[Work] = []  # the batch on the engine now
        self._running_since: float | None = None  # time.monotonic() it started
        self.broken = threading.Event()  # set once the engine failed the probe: no more work
        self.broken_why = ""  # why, once broken
        self._on_broken: list[Callable[[], object]] = []
        self.max_batch = min(max_batch, engine.info.max_batch)
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        self._probe_passed = -float("inf")  # time.monotonic() of the last passing probe
        self._queue: deque[Work] = deque()
        self._lock = threading.Condition()
        self._draining = False
        self._thread: threading.Thread | None = None

    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    def add(self, work: Work) -> None:
        """Queue `work`, or refuse it at once (queue full, draining)."""
        with self._lock:
            if self.broken.is_set():
                raise broken_error()
            if self._draining:
                raise ServiceError(ServiceReason.DRAINING, "the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise ServiceError(
                    ServiceReason.QUEUE_FULL, f"the request queue is full ({self.max_queue})"
                )
            self._queue.append(work)
            self._lock.notify()

    def cancel(self, work: Work) -> None:
        """Drop queued work (a cancelled call); running work finishes and is ignored."""
        with self._lock:
            work.cancelled = True
            if work in self._queue:
                self._queue.remove(work)

    def schedule(self) -> list[Work] | None:
        """The next batch (blocking); None once drained and stopping."""
        with self._lock:
            while not self._queue:
                if self._draining:
                    return None
                self._lock.wait()
            close_at = self._queue[0].enqueued + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._draining:
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            now = time.monotonic()
            for work in [w for w in self._queue if w.deadline is not None and now > w.deadline]:
                self._queue.remove(work)
                self._answer(work, self._expired(), BatchInfo(0, now - work.enqueued, 0.0))
            # Interactive work first (oldest first), then bulk: a batch's head is the oldest
            # interactive request while any waits, and bulk ones only fill its free rows.
            ordered = itertools.chain(
                (w for w in self._queue if not w.bulk), (w for w in self._queue if w.bulk)
            )
            window = list(itertools.islice(ordered, _WINDOW_BATCHES * self.max_batch))
            if not window:
                return []
            picked = self.policy([work.shape for work in window], self.max_batch)
            batch = [window[index] for index in picked]
            for work in batch:
                self._queue.remove(work)
            return batch

    @staticmethod
    def _expired() -> ServiceError:
        return ServiceError(ServiceReason.DEADLINE, "the deadline passed before the request ran")

    @staticmethod
    def _answer(work: Work, outcome: Outcome, info: BatchInfo) -> None:
        with _ANSWERING:  # the engine thread and the watchdog may both answer a stuck batch
            if work.answered:
                return
            work.answered = True
        if work.cancelled:
            return
        try:
            work.done(outcome, info)
        except Exception:  # a caller's callback must not stop the engine thread
            log.exception("callback of request %s failed", work.request_id)

    def execute(self, batch: list[Work]) -> list[Outcome] | ServiceError:
        """The engine's outputs for `batch`. Where it fails on a batch of several, each request
        runs again alone: a request the engine cannot run, or a batch too large for the memory
        left, then fails only itself, never the requests batched with it."""
        outputs = self._run(batch)
        if not isinstance(outputs, ServiceError):
            return outputs
        if len(batch) == 1:
            self._check_engine()
            return outputs
        alone: list[Outcome] = []
        failed_alone = False
        for work in batch:
            if work.cancelled:  # no one waits for it
                alone.append(outputs)
            elif work.deadline is not None and time.monotonic() > work.deadline:
                alone.append(self._expired())
            else:
                output = self._run([work])
                failed_alone |= isinstance(output, ServiceError)
                alone.append(output if isinstance(output, ServiceError) else output[0])
        if failed_alone:
            self._check_engine()
        return alone

    def on_broken(self, callback: Callable[[], object]) -> None:
        """Call `callback` (on the engine thread) once the engine is found broken."""
        self._on_broken.append(callback)

    def _check_engine(self) -> None:
        """After a request failed alone: whether the engine still runs the probe (unless it
        passed less than PROBE_INTERVAL_S ago). If it fails that too, the engine is broken (a
        CUDA error poisons the process's context), not the request (`_break`)."""
        if self.probe is None or self.broken.is_set():
            return
        if time.monotonic() - self._probe_passed < PROBE_INTERVAL_S:
            return
        try:
            if len(self.engine.execute([self.probe])) == 1:
                self._probe_passed = time.monotonic()
                return
            log.error("the engine's self-check gave a wrong number of outputs")
        except Exception:
            log.exception("the engine failed its self-check (the warm-up's text request)")
        self._break([], "it failed its self-check")

    def _break(self, in_flight: list[Work], why: str) -> None:
        """The engine (or this thread) can run nothing more: new work is refused, the work in
        flight and queued answered so, without running, and the listeners told (`guardrt
        serve` reports NOT_SERVING and exits for a restart)."""
        with self._lock:  # the engine thread and the watchdog may both get here: once
            first = not self.broken.is_set()
            if first:
                self.broken_why = why
                self.broken.set()
            queued = list(self._queue)
            self._queue.clear()
        now = time.monotonic()
        for work in [*in_flight, *queued]:
            self._answer(work, broken_error(), BatchInfo(0, now - work.enqueued, 0.0))
        if not first:
            return
        log.error("the engine is broken (%s): new work is refused; it needs a restart", why)
        for callback in self._on_broken:
            try:
                callback()
            except Exception:  # a listener must not stop the engine thread
                log.exception("a listener of the broken engine failed")

    def _run(self, batch: list[Work]) -> list[Outcome] | ServiceError:
        try:
            decoded: list[Outcome] = list(self.engine.execute([work.request for work in batch]))
            if len(decoded) != len(batch):  # whose is whose is unknown: none can be answered
                raise RuntimeError(f"{len(decoded)} outputs for a batch of {len(batch)}")
            return decoded
        except Exception:
            ids = ", ".join(work.request_id for work in batch)
            log.exception("engine failed on a batch of %d (requests %s)", len(batch), ids)
            return ServiceError(ServiceReason.ENGINE, "the engine failed on this request")

    def update(
        self, batch: list[Work], outputs: list[Outcome] | ServiceError, model_s: float
    ) -> None:
        now = time.monotonic()
        for index, work in enumerate(batch):
            outcome = outputs if isinstance(outputs, ServiceError) else outputs[index]
            self._answer(
                work, outcome, BatchInfo(len(batch), now - model_s - work.enqueued, model_s)
            )

    def _loop(self) -> None:
        batch: list[Work] | None = []
        try:
            while (batch := self.schedule()) is not None:
                if not batch:
                    continue
                start = time.monotonic()
                self._running, self._running_since = batch, start
                outputs = self.execute(batch)
                self._running_since = None
                self.update(batch, outputs, time.monotonic() - start)
        except Exception:  # a fault here would leave every caller waiting: fail them instead
            log.exception("the engine thread failed")
            self._break(batch or [], "its thread failed")

    def running_for(self) -> float | None:
        """How long the batch on the engine has run (None when none is)."""
        since = self._running_since
        return None if since is None else time.monotonic() - since

    def _watch(self) -> None:
        """A batch that never returns (a hung GPU) would hold every caller forever and keep
        the server in service: past `stall_s`, its requests and the queue are answered
        BROKEN and the listeners told (`guardrt serve` exits for a restart)."""
        assert self.stall_s is not None
        interval = min(1.0, self.stall_s / 4)
        while not self.broken.is_set() and self._thread is not None and self._thread.is_alive():
            running = self.running_for()
            if running is not None and running > self.stall_s:
                ids = ", ".join(work.request_id for work in self._running)
                log.error(
                    "the engine has run one batch for %.0f s (the limit is %g s: "
                    "--engine-timeout-s): it is stuck (requests %s)",
                    running, self.stall_s, ids,
                )  # fmt: skip
                self._break(list(self._running), f"it ran one batch for over {self.stall_s:g} s")
                return
            time.sleep(interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="guardrt-engine", daemon=True)
        self._thread.start()
        if self.stall_s is not None:
            watchdog = threading.Thread(target=self._watch, name="guardrt-watchdog", daemon=True)
            watchdog.start()

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work, finish what is queued, stop the engine thread; True if it stopped."""
        with self._lock:
            self._draining = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True
