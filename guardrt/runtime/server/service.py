"""The moderation service both servers (gRPC, HTTP) call: limits, preparation, batching.

Preparation (validation, tokenization, image tiling) runs on a thread pool, off the event loop;
the model runs on the scheduler's engine thread. Logs carry request ids, sizes and counts,
never prompt text or image bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from guardrt.runtime.errors import (
    ConfigError,
    GuardrtError,
    PromptError,
    PromptReason,
    ServiceError,
    ServiceReason,
)
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.scheduler import BatchInfo, Outcome, Scheduler, Work
from guardrt.runtime.scores import TokenLogprob
from guardrt.runtime.server.image_urls import ImageFetcher, Origin
from guardrt.runtime.server.rates import TokenBucket, burst_for
from guardrt.runtime.server.request_log import log_request
from guardrt.runtime.server.server_policy import ServerPolicy
from guardrt.runtime.server.tokens import logged_caller
from guardrt.runtime.server.verdict_cache import (
    INLINE_KEY_BYTES,
    CachedVerdict,
    VerdictCache,
    image_bytes,
    input_key,
)
from guardrt.runtime.verdict import Verdict

log = logging.getLogger("guardrt.service")


@dataclass(frozen=True)
class ModerationInput:
    """A request as both servers hand it over (messages in the Python API's format)."""

    request_id: str
    messages: Sequence[Mapping[str, Any]]
    categories: Sequence[tuple[str, str]] | None = None
    excluded: Sequence[str] = ()
    # Roles whose messages are left out unread, numbering kept (`parse_messages`): the HTTP
    # API's system and developer messages.
    ignored_roles: tuple[str, ...] = ()
    # A backlog's request: run after interactive ones, within its share of the queue.
    bulk: bool = False
    # Who sent it: its bearer token's name (tokens.py), for the logs; "" when not known.
    caller: str = ""
    # The caller's trace (W3C traceparent, trace.py), for the logs; "" without one.
    trace_id: str = ""
    # Token logprobs of the verdict (the HTTP API's `logprobs`): None for none, else with this
    # many alternatives at each token (`PreparedRequest.top_logprobs`).
    top_logprobs: int | None = None
    # The request's decision threshold on P(unsafe) (`policy.check_threshold`); None: the
    # server policy's.
    unsafe_threshold: float | None = None


@dataclass(frozen=True)
class Timing:
    queue_ms: float
    preprocess_ms: float
    model_ms: float
    total_ms: float
    batch_size: int
    prefill_ms: float = 0.0  # of model_ms: image encoding and the batch's first forward
    decode_ms: float = 0.0  # of model_ms: the later forwards (categories of unsafe verdicts)
    cached: bool = False  # answered from the verdict cache (verdict_cache.py): no batch, no model


@dataclass(frozen=True)
class ModerationResult:
    request_id: str
    verdict: Verdict
    timing: Timing
    prompt_tokens: int
    reused_tokens: int = 0  # prompt tokens read from a session's cache, not recomputed
    generated_tokens: int = 0  # tokens of the verdict the model wrote
    image_tiles: int = 0  # tiles of the request's image (0: text only)
    # The content tokens' log-probabilities, when the request asked (`Decoded.content_logprobs`)
    token_logprobs: tuple[TokenLogprob, ...] | None = None
    # The threshold that decided the label (`PreparedRequest.unsafe_threshold`); None: none.
    unsafe_threshold: float | None = None


# A caller's request id lands in logs and responses: printable ASCII without spaces, so that it
# can forge no log line and travels unchanged in any header or proto field.
_REQUEST_ID = re.compile(r"[!-~]{1,128}")


def checked_request_id(value: str) -> str:
    """The caller's request id, or a new one when it is empty; a ConfigError (naming the
    offending length or character, not echoing the value) when it is not 1 to 128 printable
    ASCII characters."""
    if not value:
        return uuid.uuid4().hex
    if _REQUEST_ID.fullmatch(value):
        return value
    if len(value) > 128:
        detail = f"it has {len(value)} characters"
    else:
        index, bad = next((i, c) for i, c in enumerate(value) if not "!" <= c <= "~")
        detail = f"character {index} is U+{ord(bad):04X}"
    raise ConfigError(
        f"request_id must be 1 to 128 printable ASCII characters without spaces; {detail}"
    )


@dataclass(frozen=True)
class Limits:
    max_text_chars: int = 200_000  # all text parts of a conversation together
    # Requests one authenticated caller may have in flight (admitted, not yet answered); 0: no
    # limit. One service's burst then cannot fill the queue the others share.
    max_in_flight_per_caller: int = 0
    # Requests a second one authenticated caller may start (rates.py), and how many at once
    # after a quiet spell (0: one second's worth); 0.0: no limit.
    max_rate_per_caller: float = 0.0
    rate_burst_per_caller: int = 0


def text_chars(messages: Sequence[Mapping[str, Any]]) -> int:
    """Characters of text in messages (before validation: malformed parts count 0)."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, Sequence):
            total += sum(
                len(part["text"])
                for part in content
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
            )
    return total


class ModerationService:
    def __init__(
        self,
        preparer: Preparer,
        scheduler: Scheduler,
        limits: Limits,
        executor: ThreadPoolExecutor,
        fetcher: ImageFetcher | None = None,
        origins: tuple[Origin, ...] = (),
        cache: VerdictCache | None = None,
        policy: ServerPolicy | None = None,
    ) -> None:
        """`fetcher`: fetches images given by URL from `origins` (`image_urls.py`), for both
        front ends (one connection pool, one bound on fetches at a time); None: no URLs.
        `cache`: verdicts of inputs judged before (`verdict_cache.py`); None: off. `policy`:
        the server's, for requests without categories (`server_policy.py`)."""
        self.cache = cache
        self.policy = policy or ServerPolicy()
        self.preparer, self.scheduler, self.limits = preparer, scheduler, limits
        self.executor = executor
        self.fetcher, self.origins = fetcher, origins if fetcher is not None else ()
        # Requests admitted and still being prepared: they count against --max-queue with the
        # scheduler's queue, so that a burst is refused at the door, before its images are
        # decoded and tiled only to find the queue full.
        self._preparing = 0
        self._admission = threading.Lock()
        # Bulk requests in flight (admitted, not yet answered) hold at most half the queue, so
        # that interactive ones always find room however large a backlog is.
        self.bulk_share = max(1, scheduler.max_queue // 2)
        self._bulk = asyncio.Semaphore(self.bulk_share)
        self._bulk_held = 0  # bulk requests holding a place in the share (for /metrics)
        self._callers: dict[str, asyncio.Semaphore] = {}  # per authenticated caller
        self._rates: dict[str, TokenBucket] = {}  # per authenticated caller

    async def fetched(self, item: ModerationInput) -> ModerationInput:
        """`item` with its image fetched when it was given by URL (a full queue refuses it
        first); ImageUrlError when it cannot be (never a verdict without it)."""
        if self.fetcher is None or not self.fetcher.wanted(item):
            return item
        self.check_room()  # no fetch only to find the queue full
        return await self.fetcher.resolve(item)

    def prepare(self, item: ModerationInput) -> PreparedRequest:
        """Validate and prepare one request (blocking: call it on a worker thread)."""
        chars = text_chars(item.messages)
        if chars > self.limits.max_text_chars:
            raise PromptError(
                PromptReason.TOO_LONG,
                f"the conversation has {chars} characters of text; the limit is "
                f"{self.limits.max_text_chars}",
            )
        categories, excluded = self.policy.apply(item.categories, item.excluded)
        return self.preparer.prepare(
            item.messages,
            categories=categories,
            excluded_categories=excluded,
            ignored_roles=item.ignored_roles,
            unsafe_threshold=self.policy.threshold(item.unsafe_threshold),
        )

    def preparing(self) -> int:
        """Requests admitted and being prepared."""
        return self._preparing

    def check_room(self) -> None:
        """Raise QUEUE_FULL when the requests being prepared and those queued for the engine
        fill --max-queue (the HTTP API asks before it reads a body)."""
        if self._preparing + self.scheduler.depth() >= self.scheduler.max_queue:
            raise ServiceError(
                ServiceReason.QUEUE_FULL,
                f"the request queue is full ({self.scheduler.max_queue}, counting the requests "
                "being prepared)",
            )

    async def prepared(self, item: ModerationInput) -> PreparedRequest:
        """`prepare` off the event loop (small text on it), admitted first: refused at once
        (QUEUE_FULL) when the requests being prepared and those queued for the engine already
        fill --max-queue."""
        with self._admission:
            self.check_room()
            self._preparing += 1
        try:
            if _is_small(item):  # cheaper than two thread hops: tokenizing ~2k chars is ~0.1 ms
                return self.prepare(item)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, self.prepare, item)
        finally:
            with self._admission:
                self._preparing -= 1

    @contextlib.asynccontextmanager
    async def _bulk_share(
        self, bulk: bool, hold: bool, deadline: float | None
    ) -> AsyncIterator[None]:
        """A bulk request's place in the bulk share: refused at once when the share is full,
        or with `hold` waited for (until `deadline`). Interactive requests pass."""
        if not bulk:
            yield
            return
        full = (
            f"bulk requests fill their share of the queue ({self.bulk_share} of "
            f"{self.scheduler.max_queue}); the rest is kept for interactive requests: retry "
            "later, or send the backlog over ModerateMany (held back, not refused)"
        )
        async with _place(self._bulk, hold, deadline, full):
            self._bulk_held += 1
            try:
                yield
            finally:
                self._bulk_held -= 1

    @contextlib.asynccontextmanager
    async def _caller_share(
        self, caller: str, hold: bool, deadline: float | None
    ) -> AsyncIterator[None]:
        """A place among the requests its caller may have in flight (--max-in-flight-per-caller,
        authenticated callers only), refused or (`hold`) waited for as `_bulk_share`."""
        limit = self.limits.max_in_flight_per_caller
        if not limit or logged_caller(caller) is None:
            yield
            return
        places = self._callers.setdefault(caller, asyncio.Semaphore(limit))
        full = (
            f"caller {caller} has {limit} requests in flight, its limit "
            "(--max-in-flight-per-caller): retry when one is answered"
        )
        async with _place(places, hold, deadline, full):
            yield

    async def _cache_key(self, item: ModerationInput, session: int | None) -> bytes | None:
        """The request's verdict-cache key (`verdict_cache.py`); None without a cache, for a
        stream's session (whose K/V bookkeeping needs its run), or for what no key stands for.
        A large image is hashed off the event loop."""
        if self.cache is None or session is not None:
            return None
        categories, excluded = self.policy.apply(item.categories, item.excluded)
        keyed = functools.partial(
            input_key, item.messages, categories, excluded, item.ignored_roles,
            item.top_logprobs, self.policy.threshold(item.unsafe_threshold),
        )  # fmt: skip
        if image_bytes(item.messages) <= INLINE_KEY_BYTES:
            return keyed()
        return await asyncio.get_running_loop().run_in_executor(self.executor, keyed)

    async def _caller_rate(self, caller: str, hold: bool, deadline: float | None) -> None:
        """A token from its caller's bucket (--max-rate-per-caller, authenticated callers
        only): refused at once when there is none, saying when there will be; with `hold`,
        the next token reserved and waited for (DEADLINE when it comes after `deadline`)."""
        rate = self.limits.max_rate_per_caller
        if not rate or logged_caller(caller) is None:
            return
        now = time.monotonic()
        bucket = self._rates.get(caller)
        if bucket is None:
            burst = burst_for(rate, self.limits.rate_burst_per_caller)
            bucket = self._rates[caller] = TokenBucket.full(rate, burst, now)
        if not hold:
            wait = bucket.take(now)
            if wait:
                raise ServiceError(
                    ServiceReason.RATE_LIMITED,
                    f"caller {caller} is past its rate of {rate:g} requests a second "
                    f"(--max-rate-per-caller): retry in {math.ceil(wait * 1000)} ms",
                    retry_after_s=wait,
                )
            return
        wait = bucket.reserve(now)
        if deadline is not None and now + wait > deadline:
            bucket.give_back()
            raise ServiceError(
                ServiceReason.DEADLINE,
                f"caller {caller}'s rate ({rate:g} requests a second) would start the request "
                "after its deadline",
            )
        if wait:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:  # the caller went away: its turn goes back
                bucket.give_back()
                raise

    def bulk_held(self) -> int:
        """Bulk requests in flight (admitted to the bulk share, not yet answered)."""
        return self._bulk_held

    async def run(
        self,
        request: PreparedRequest,
        request_id: str,
        deadline: float | None,
        bulk: bool = False,
    ) -> tuple[Decoded, BatchInfo]:
        """Queue a prepared request for the engine and wait for it (cancellable); `bulk` runs
        it after the interactive requests queued."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Outcome, BatchInfo]] = loop.create_future()

        def done(outcome: Outcome, info: BatchInfo) -> None:
            loop.call_soon_threadsafe(_resolve, future, (outcome, info))

        work = Work(request, request_id, done, deadline, bulk=bulk)
        self.scheduler.add(work)
        try:
            outcome, info = await future
        except asyncio.CancelledError:
            self.scheduler.cancel(work)
            raise
        if isinstance(outcome, ServiceError):
            raise outcome
        return outcome, info

    async def moderate_all(
        self, items: Sequence[ModerationInput], deadline: float | None, hold: bool = False
    ) -> list[ModerationResult]:
        """Every item's verdict, or the first error (located at its item) and none of them:
        the rest are cancelled (their queued work dropped unrun), so a refused call leaves no
        work behind. More items than the queue holds could never all be queued: a ConfigError
        naming both counts. `hold`: bulk items past their share wait for room."""
        if len(items) > self.scheduler.max_queue:
            raise ConfigError(
                f"the call has {len(items)} inputs; this server queues at most "
                f"{self.scheduler.max_queue} (--max-queue): split it"
            )
        tasks = [asyncio.ensure_future(self.moderate(item, deadline, hold=hold)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        except GuardrtError as exc:
            failed = next((i for i, task in enumerate(tasks) if _raised(task) is exc), None)
            if failed is not None:
                exc.located(item=failed)
            raise
        finally:  # after an error (or the caller's cancellation), nothing left running
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def moderate(
        self,
        item: ModerationInput,
        deadline: float | None,
        session: int | None = None,
        hold: bool = False,
    ) -> ModerationResult:
        """The verdict for one request; raises GuardrtError subclasses for the servers to map.
        `session` (from the engine's `open_session`) lets the engine reuse the K/V of the
        session's previous request. A bulk request past its share of the queue is refused
        (QUEUE_FULL), or with `hold` (a stream's) waits for room; so does a request past its
        caller's rate (RATE_LIMITED), or with `hold` waits for its turn."""
        await self._caller_rate(item.caller, hold, deadline)
        async with (
            self._caller_share(item.caller, hold, deadline),
            self._bulk_share(item.bulk, hold, deadline),
        ):
            return await self._moderate(item, deadline, session)

    async def _moderate(
        self, item: ModerationInput, deadline: float | None, session: int | None
    ) -> ModerationResult:
        started = time.monotonic()
        request_id = item.request_id or uuid.uuid4().hex  # checked by the front ends
        # An image given by URL is fetched once the request is admitted (its caller's rate
        # and shares): a refused call makes no outbound connection.
        item = await self.fetched(item)
        key = await self._cache_key(item, session)
        hit = None if key is None or self.cache is None else self.cache.get(key)
        if hit is not None:  # judged before: neither prepared nor run again
            spent_ms = (time.monotonic() - started) * 1e3
            timing = Timing(0.0, spent_ms, 0.0, spent_ms, 0, cached=True)
            result = ModerationResult(
                request_id, hit.verdict, timing, hit.prompt_tokens, 0,
                hit.generated_tokens, hit.image_tiles, hit.token_logprobs, hit.unsafe_threshold,
            )  # fmt: skip
        else:
            result = await self._run_fresh(item, request_id, deadline, session, started)
            if key is not None and self.cache is not None:
                entry = CachedVerdict(
                    result.verdict, result.prompt_tokens, result.generated_tokens,
                    result.image_tiles, result.token_logprobs, result.unsafe_threshold,
                )  # fmt: skip
                self.cache.put(key, entry)
        log_request(item, result, text_chars(item.messages))
        return result

    async def _run_fresh(
        self,
        item: ModerationInput,
        request_id: str,
        deadline: float | None,
        session: int | None,
        started: float,
    ) -> ModerationResult:
        """Prepare and run one request (`started`: when it reached the service)."""
        request = dataclasses.replace(
            await self.prepared(item), session=session, top_logprobs=item.top_logprobs
        )
        prepared = time.monotonic()
        decoded, info = await self.run(request, request_id, deadline, item.bulk)
        timing = Timing(
            queue_ms=info.queue_s * 1e3,
            preprocess_ms=(prepared - started) * 1e3,
            model_ms=info.model_s * 1e3,
            total_ms=(time.monotonic() - started) * 1e3,
            batch_size=info.size,
            prefill_ms=decoded.prefill_s * 1e3,
            decode_ms=decoded.decode_s * 1e3,
        )
        return ModerationResult(
            request_id,
            decoded.verdict(),
            timing,
            len(request.prompt),
            decoded.reused_tokens,
            len(decoded.generated),
            request.image.num_tiles if request.image else 0,
            decoded.content_logprobs(),
            request.unsafe_threshold,
        )


_SMALL_TEXT = 2_000


@contextlib.asynccontextmanager
async def _place(
    places: asyncio.Semaphore, hold: bool, deadline: float | None, full: str
) -> AsyncIterator[None]:
    """One of `places`: QUEUE_FULL (`full` says why) at once when none is free, or with `hold`
    waited for until `deadline` (DEADLINE past it)."""
    if places.locked() and not hold:
        raise ServiceError(ServiceReason.QUEUE_FULL, full)
    try:
        async with asyncio.timeout(None if deadline is None else deadline - time.monotonic()):
            await places.acquire()
    except TimeoutError:
        raise ServiceError(
            ServiceReason.DEADLINE, "the deadline passed while the request waited for room"
        ) from None
    try:
        yield
    finally:
        places.release()


def _raised(task: asyncio.Future[Any]) -> BaseException | None:
    return task.exception() if task.done() and not task.cancelled() else None


def _is_small(item: ModerationInput) -> bool:
    """Text-only and short: prepared on the event loop itself."""
    for message in item.messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        parts = content if isinstance(content, Sequence) and not isinstance(content, str) else ()
        if any(isinstance(p, Mapping) and p.get("type") != "text" for p in parts):
            return False
    return text_chars(item.messages) <= _SMALL_TEXT


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # cancelled meanwhile
        future.set_result(value)
