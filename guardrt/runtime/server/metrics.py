"""Prometheus metrics shared by both servers (one registry per server, not the global one)."""

from __future__ import annotations

import math
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from guardrt.runtime.server.service import ModerationResult
from guardrt.runtime.server.tokens import ANYONE, NOT_AUTHENTICATED

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(
        self,
        queue_depth: Callable[[], float],
        preparing: Callable[[], float] = lambda: 0.0,
        bulk: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "guardrt_requests",
            "Requests answered, by route, status code (HTTP's number, or gRPC's status name) and "
            "reason ('ok' when answered).",
            ["route", "code", "reason"],
            registry=self.registry,
        )
        self.stage = Histogram(
            "guardrt_stage_seconds",
            "Time per request in each stage: queue, preprocess, prefill and decode (its "
            "batch's first forward with image encoding, then the later forwards), model "
            "(both), total.",
            ["stage"],
            buckets=_SECONDS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "guardrt_batch_size",
            "Requests in the batch each request ran in.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        self.label_probability = Histogram(
            "guardrt_label_probability",
            "P(safe) + P(unsafe) at each verdict's first word (full-vocabulary softmax): near 1 "
            "for Llama Guard. A share of low values means inputs the model does not know how to "
            "judge, or a model (or quantization) that does not answer as Llama Guard does.",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999),
            registry=self.registry,
        )
        self.rejections = Counter(
            "guardrt_rejections",
            "Requests refused before running, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.verdicts = Counter(
            "guardrt_verdicts",
            "Verdicts given, by label (safe, unsafe, error: an output outside the verdict "
            "grammar) and input (text, or image: a conversation with an image).",
            ["label", "input"],
            registry=self.registry,
        )
        self.callers = Counter(
            "guardrt_caller_requests",
            "Requests by caller (the name its bearer token has in --auth-token-file: 'unnamed' "
            "without one, 'anyone' when no token is required, 'none' when refused before "
            "authentication) and outcome (answered, refused).",
            ["caller", "outcome"],
            registry=self.registry,
        )
        self.cached = Counter(
            "guardrt_verdicts_cached",
            "Verdicts answered from the verdict cache (--verdict-cache): inputs judged before, "
            "answered without the engine (also counted in guardrt_verdicts).",
            registry=self.registry,
        )
        self.categories = Counter(
            "guardrt_unsafe_categories",
            "Categories named by unsafe verdicts, by code (a verdict naming two counts twice).",
            ["category"],
            registry=self.registry,
        )
        depth = Gauge(
            "guardrt_queue_depth", "Requests waiting for a batch.", registry=self.registry
        )
        depth.set_function(queue_depth)
        waiting = Gauge(
            "guardrt_preparing",
            "Requests admitted and being prepared (validated, tokenized, their image tiled); "
            "with guardrt_queue_depth they count against --max-queue.",
            registry=self.registry,
        )
        waiting.set_function(preparing)
        backlog = Gauge(
            "guardrt_bulk_in_flight",
            "Bulk requests (priority BULK, service_tier flex) admitted and not yet answered; "
            "they may hold up to half of --max-queue.",
            registry=self.registry,
        )
        backlog.set_function(bulk)

    def describe(self, labels: dict[str, str], ready: Callable[[], bool]) -> None:
        """What is served (`guardrt_build_info`, the usual constant-1 info gauge) and whether
        it takes work (`guardrt_ready`: 0 while draining or once the engine is broken)."""
        build = Gauge(
            "guardrt_build_info",
            "What this server serves: guardrt's version, the model, back end, device, precision, "
            "semantics and decoding (always 1).",
            list(labels),
            registry=self.registry,
        )
        build.labels(**labels).set(1)
        gauge = Gauge(
            "guardrt_ready",
            "1 while the server takes work (loaded and warmed); 0 while draining or once its "
            "engine is broken, as /readyz and gRPC health say.",
            registry=self.registry,
        )
        gauge.set_function(lambda: float(ready()))

    def answered(
        self, route: str, result: ModerationResult, code: str = "200", caller: str = ANYONE
    ) -> None:
        """A verdict given: `code` is "200" on HTTP routes, "OK" on gRPC's."""
        self.requests.labels(route, code, "ok").inc()
        self.callers.labels(caller, "answered").inc()
        verdict = result.verdict
        self.verdicts.labels(verdict.label.value, "image" if result.image_tiles else "text").inc()
        for category in verdict.categories:
            self.categories.labels(category).inc()
        label_probability = result.verdict.label_probability
        if not math.isnan(label_probability):  # NaN: greedy output off the grammar's path
            self.label_probability.observe(label_probability)
        timing = result.timing
        if timing.cached:  # no queue, batch or model: their histograms are the engine's
            self.cached.inc()
            stages = [("preprocess", timing.preprocess_ms), ("total", timing.total_ms)]
        else:
            stages = [
                ("queue", timing.queue_ms),
                ("preprocess", timing.preprocess_ms),
                ("prefill", timing.prefill_ms),
                ("decode", timing.decode_ms),
                ("model", timing.model_ms),
                ("total", timing.total_ms),
            ]
            self.batch_size.observe(timing.batch_size)
        for stage, milliseconds in stages:
            self.stage.labels(stage).observe(milliseconds / 1e3)

    def failed(self, route: str, code: str, reason: str, caller: str = NOT_AUTHENTICATED) -> None:
        self.requests.labels(route, code, reason).inc()
        self.rejections.labels(reason).inc()
        self.callers.labels(caller, "refused").inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
