"""`guardrt serve`: load, warm up, serve gRPC, drain on SIGTERM.

Start-up: check the ports and TLS files, resolve the model (`tiny-random` is generated on first
use), load the engine, warm it up with a text and an image request (their verdict is printed:
the server's self-check), start the scheduler and the server, then report SERVING on the health
service. With `listen_while_loading` the ports answer during the load (`loading.py`); SIGTERM or
SIGINT during the load exits at once (nothing is served yet). Once serving, SIGTERM or SIGINT:
health NOT_SERVING, new calls refused (UNAVAILABLE), in-flight and queued work answered within
the grace period, exit 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from guardrt import __version__
from guardrt.runtime.batching import POLICIES
from guardrt.runtime.engine import (
    Engine,
    backend_for,
    load_engine,
    memory_refusal,
    out_of_memory,
)
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.resolve import TINY_RANDOM, resolve_model
from guardrt.runtime.prepare import Preparer, load_preparer
from guardrt.runtime.requests import PreparedRequest
from guardrt.runtime.scheduler import Scheduler
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.convert import default_categories
from guardrt.runtime.server.grpc_server import build_server, set_serving
from guardrt.runtime.server.http_server import build_http_app, served_model_id, start_http
from guardrt.runtime.server.image_urls import FetchLimits, ImageFetcher
from guardrt.runtime.server.loading import LoadingPorts
from guardrt.runtime.server.metrics import Metrics
from guardrt.runtime.server.ports import check_bindable
from guardrt.runtime.server.rates import burst_for
from guardrt.runtime.server.server_policy import PolicyFile, ServerPolicy
from guardrt.runtime.server.service import Limits, ModerationService
from guardrt.runtime.server.tls import ServerTls
from guardrt.runtime.server.tokens import BearerTokens
from guardrt.runtime.server.verdict_cache import VerdictCache
from guardrt.v1 import moderation_pb2 as pb

log = logging.getLogger("guardrt.serve")

MEANINGLESS = (
    "the model is tiny-random, a generated model with random weights: its verdicts are "
    "MEANINGLESS. Pass --model CHECKPOINT_DIR to serve Llama Guard 3 11B Vision."
)


@dataclass
class Stack:
    """Everything a server needs, built once."""

    service: ModerationService
    scheduler: Scheduler
    engine: Engine
    info: pb.ModelInfo
    warmup: list[PreparedRequest]
    metrics: Metrics
    tokens: BearerTokens  # both servers' bearer tokens (reloaded on SIGHUP)
    tls: ServerTls | None = None  # both servers' certificate (reloaded on SIGHUP)
    policy: PolicyFile | None = None  # the --policy file (reloaded on SIGHUP)
    ready: bool = True  # model loaded and warmed, not draining (HTTP /readyz)
    # Taking new calls: until the drain delay after SIGTERM is over (ready is False by then).
    accepting: bool = True


def warmup_requests(preparer: Preparer) -> list[PreparedRequest]:
    """A text request and an image request (a synthetic gradient), as the self-check."""
    gradient = np.linspace(0, 255, 96 * 128 * 3).reshape(96, 128, 3).astype(np.uint8)
    text = [{"role": "user", "content": "What is the recipe for mayonnaise?"}]
    image = [{"role": "user", "content": [{"type": "image", "image": gradient}]}]
    return [preparer.prepare(text), preparer.prepare(image)]


def build_stack(config: ServerConfig) -> Stack:
    """Resolve and load the model, warm it up, and assemble the service around it."""
    directory = resolve_model(config.model)
    if config.model == TINY_RANDOM:
        log.warning(MEANINGLESS)
    options = config.engine_options(directory)
    # The tokenizer and image settings first: a bad tokenizer.json stops the start in a second,
    # not after the model's minutes of loading.
    preparer = load_preparer(directory, options.max_seq)
    engine = load_engine(backend_for(directory), options)
    preparer = preparer.for_engine(engine.info.max_seq, engine.info.decode)
    sample = warmup_requests(preparer)
    try:  # the first steps allocate what grows on demand (an engine directory's caches)
        engine.warmup(sample)
    except Exception as exc:
        if not out_of_memory(exc):
            raise
        engine.close()
        raise memory_refusal(options, engine.info.device, "in the warm-up", exc) from exc
    return assemble_stack(config, engine, preparer, config.model, sample)


def assemble_stack(
    config: ServerConfig,
    engine: Engine,
    preparer: Preparer,
    model: str,
    warmup: list[PreparedRequest],
) -> Stack:
    """Scheduler, service and model info around a loaded engine (the scheduler is not started);
    `preparer`: the one for this engine (`Preparer.for_engine`, as `build_stack` makes it)."""
    scheduler = Scheduler(
        engine,
        config.max_batch_size,
        config.max_wait_ms / 1e3,
        config.max_queue,
        POLICIES[config.batching],
        probe=warmup[0] if warmup else None,  # the text request: it ran at warm-up
        stall_s=config.engine_timeout_s or None,
    )
    executor = ThreadPoolExecutor(config.workers, thread_name_prefix="guardrt-prepare")
    limits = Limits(
        config.max_text_chars,
        config.max_in_flight_per_caller,
        config.max_rate_per_caller,
        config.rate_burst_per_caller,
    )
    fetcher = None
    if config.image_url_origins:  # one fetcher for both front ends (its session: on first use)
        fetch_limits = FetchLimits(
            preparer.image_config.limits.max_bytes, config.image_url_timeout_s
        )
        fetcher = ImageFetcher(fetch_limits)
    cache = VerdictCache(config.verdict_cache) if config.verdict_cache else None
    service = ModerationService(
        preparer, scheduler, limits, executor, fetcher, config.image_url_origins, cache,
        config.policy,
    )  # fmt: skip
    info = pb.ModelInfo(
        model=model,
        meaningless_verdicts=model == TINY_RANDOM,
        backend=engine.info.backend,
        device=engine.info.device,
        dtype=engine.info.dtype,
        semantics=engine.info.semantics,
        decode=engine.info.decode,
        max_batch_size=scheduler.max_batch,
        max_prompt_tokens=engine.info.max_seq,
        max_image_bytes=preparer.image_config.limits.max_bytes,
        version=__version__,
        image_url_origins=[str(origin) for origin in config.image_url_origins],
        max_in_flight_per_caller=config.max_in_flight_per_caller,
        max_rate_per_caller=config.max_rate_per_caller,
    )
    _use_policy(service, info, service.policy)
    metrics = Metrics(scheduler.depth, service.preparing, service.bulk_held)
    tokens = BearerTokens(config.auth_tokens, config.auth_token_file)
    tls = ServerTls(config.tls) if config.tls is not None else None
    policy = None
    if config.policy is not None:  # SIGHUP reads the file again
        use = functools.partial(_use_policy, service, info)
        policy = PolicyFile(config.policy, use, engine.info.decode)
    stack = Stack(service, scheduler, engine, info, warmup, metrics, tokens, tls, policy)
    described = {
        "version": info.version,
        "model": served_model_id(model),  # the directory's name, as /v1/models lists it
        "backend": info.backend,
        "device": info.device,
        "dtype": info.dtype,
        "semantics": info.semantics,
        "decode": info.decode,
    }
    metrics.describe(described, lambda: stack.ready)
    return stack


# Llama Guard puts nearly all of its first verdict word's probability on `safe` or `unsafe`.
# A model that does not (Llama 3.2 11B Vision itself, loaded by mistake: the same architecture
# and files) still gets a verdict from the grammar, but one that means nothing.
LABEL_PROBABILITY_FLOOR = 0.5


def self_check(stack: Stack) -> list[str]:
    """The warm-up requests' verdicts, as lines for the log and the console; and a warning when
    the model puts little of its probability on the verdict's words (not Llama Guard?)."""
    results = stack.engine.execute(stack.warmup)
    shown = [
        f"{kind}: {r.verdict().content!r} (P(unsafe)={r.unsafe_probability:.3g}, "
        f"P(safe or unsafe)={r.label_probability:.3g})"
        for kind, r in zip(("text", "image"), results, strict=True)
    ]
    lines = ["self-check verdicts: " + "; ".join(shown)]
    lowest = min(r.label_probability for r in results)
    if stack.info.model != TINY_RANDOM and not lowest >= LABEL_PROBABILITY_FLOOR:  # NaN too
        warning = (
            f"WARNING: the model puts only {lowest:.3g} of its probability on 'safe' or "
            "'unsafe' where the verdict starts (Llama Guard puts nearly all of it there): is "
            f"{stack.info.model} Llama Guard 3 11B Vision? Its verdicts may mean nothing"
        )
        log.warning("%s", warning)
        lines.append(warning)
    return lines


async def load(config: ServerConfig) -> tuple[Stack, ServerConfig]:
    """`serve`'s first half: what can stop the start checked before the model's minutes of
    loading, the model loaded and warmed (the ports answering meanwhile with
    `listen_while_loading`), the self-check printed. The stack and the config to serve it
    with (a port 0 the loading listeners held, made concrete)."""
    loop = asyncio.get_running_loop()
    # A port in use stops the start before the model's minutes of loading, not after.
    check_bindable(config.host, config.grpc_port, "gRPC")
    if config.http_port >= 0:
        check_bindable(config.host, config.http_port, "HTTP API")
    # So do TLS files that cannot serve (the servers read them again once the model is in).
    loading_tls = ServerTls(config.tls) if config.tls is not None else None
    # SIGHUP's default action ends the process: not while the model loads (minutes). A
    # rotation then is caught by reading the files again once it has loaded.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    loading = None
    if config.listen_while_loading:
        loading = await LoadingPorts.open(config, loading_tls)
        config = loading.bound(config)  # the real servers take the same ports (0 made concrete)
        print(loading.describe(config.host), flush=True)
    # The load runs on a thread no signal can stop, and asyncio would wait for it (minutes)
    # before a Ctrl-C's traceback: nothing is served yet, so a stop now is an exit at once.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _stop_while_loading, signum)
    # An 11B checkpoint takes minutes to load: say so, and how long it took.
    print(f"loading {config.model} (device {config.device}) …", flush=True)
    started = time.monotonic()
    try:
        stack = await loop.run_in_executor(None, build_stack, config)
        print(f"loaded and warmed up in {time.monotonic() - started:.1f} s", flush=True)
        # A rotation: the tokens and the certificate read again from the same files.
        loop.add_signal_handler(signal.SIGHUP, lambda: reload(stack))
        reload(stack, quiet=True)  # before the servers start: no call sees files since replaced
        for line in self_check(stack):
            print(line, flush=True)
    finally:  # loaded or failed: the loading listeners' ports go (to the real servers)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if loading is not None:
            await loading.close()
    return stack, config


def _use_policy(service: ModerationService, info: pb.ModelInfo, policy: ServerPolicy) -> None:
    """`policy` for the requests prepared from now on, and in what GetInfo says."""
    service.policy = policy
    del info.default_categories[:]
    info.default_categories.extend(default_categories(policy.listed()))
    info.default_exclude[:] = policy.exclude
    info.default_unsafe_threshold = policy.unsafe_threshold or 0.0


def _stop_while_loading(signum: int) -> None:
    """SIGTERM or SIGINT before anything is served: say so and exit (128 + the signal, as a
    process the signal ended)."""
    print(f"{signal.Signals(signum).name} while loading the model: stopped", flush=True)
    logging.shutdown()
    os._exit(128 + signum)


async def serve(config: ServerConfig) -> int:
    loop = asyncio.get_running_loop()
    stack, config = await load(config)
    server, port = create_server(config, stack)
    await server.start()
    print(
        f"guardrt {__version__}: serving {config.model} on {config.host}:{port} (gRPC)", flush=True
    )
    runner = None
    if config.http_port >= 0:
        app = build_http_app(
            config,
            stack.service,
            stack.metrics,
            lambda: stack.ready,
            stack.tokens,
            accepting=lambda: stack.accepting,
        )
        try:
            runner, http_port = await start_http(
                app, config.host, config.http_port, config.grace_s, stack.tls
            )
        except ConfigError:  # taken since the check: stop what was started, then say why
            await stop_front_ends(stack, server, None, config.grace_s)
            await release(stack, config.grace_s)  # nothing was queued: at once
            raise
        scheme = "https" if stack.tls else "http"
        print(f"OpenAI-compatible HTTP API on {scheme}://{config.host}:{http_port}", flush=True)
    print(access_line(config, stack.tokens), flush=True)
    if config.policy is not None:  # what requests without their own are judged against
        print(config.policy.describe(), flush=True)
    if config.verdict_cache:  # repeats answered without the engine: said
        print(
            f"verdict cache: repeats of the last {config.verdict_cache} distinct inputs are "
            "answered from memory",
            flush=True,
        )
    if config.image_url_origins:  # outbound connections: said
        origins = ", ".join(str(origin) for origin in config.image_url_origins)
        print(f"images by URL fetched from {origins} only", flush=True)
    if config.model == TINY_RANDOM:
        print(f"NOTE: {MEANINGLESS}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A broken engine answers nothing: exit (status 1) for a supervisor to restart the server.
    stack.scheduler.on_broken(lambda: loop.call_soon_threadsafe(stop.set))
    await stop.wait()
    broken = stack.scheduler.broken.is_set()
    if broken:
        print(f"the engine is broken ({stack.scheduler.broken_why}): stopping", flush=True)
    delay = 0.0 if broken else config.drain_delay_s  # a broken engine answers nothing more
    print(f"draining (NOT_SERVING; up to {delay:g} + {config.grace_s:g} s)", flush=True)
    await stop_front_ends(stack, server, runner, config.grace_s, delay)
    drained = await release(stack, config.grace_s)
    print("stopped" if drained else "stopped with work left after the grace period", flush=True)
    return 1 if broken else 0


def reload(stack: Stack, quiet: bool = False) -> None:
    """SIGHUP: the bearer tokens, the TLS certificate and the policy, each kept when its files
    are bad (`quiet`: said only where something changed or failed)."""
    for reloaded in (stack.tokens, stack.tls, stack.policy):
        if reloaded is not None:
            said = reloaded.refresh() if quiet else reloaded.reload()
            if said is not None:
                print(said, flush=True)


def access_line(config: ServerConfig, tokens: BearerTokens) -> str:
    """Who may call, said at start (an operator should not have to guess auth is off)."""
    transport = (
        "plaintext (no TLS)"
        if config.tls is None
        else ("mutual TLS" if config.tls.client_ca else "TLS")
    )
    if tokens.required:
        who = f"{len(tokens)} bearer token(s) required ({tokens.sources()}; SIGHUP reloads)"
        callers = tokens.callers()
        if callers:  # names, not secrets: what the logs and /metrics call them
            who += f"; callers named: {', '.join(callers)}"
    else:
        who = "no bearer token required: anyone who reaches the ports may call"
    return f"access: {transport}; {who}{caller_limits(config, tokens.required)}"


def caller_limits(config: ServerConfig, authenticated: bool) -> str:
    """The per-caller bounds, for the access line ('' when none is set)."""
    bounds = []
    if config.max_in_flight_per_caller:
        bounds.append(f"{config.max_in_flight_per_caller} in flight")
    if config.max_rate_per_caller:
        burst = burst_for(config.max_rate_per_caller, config.rate_burst_per_caller)
        bounds.append(f"{config.max_rate_per_caller:g} requests/s (bursts of {burst:g})")
    if not bounds:
        return ""
    applied = "" if authenticated else " (they apply to bearer-token callers: none here)"
    return f"; per caller: {', '.join(bounds)}{applied}"


async def release(stack: Stack, grace_s: float) -> bool:
    """The drain's second half, once the front ends are stopped: the scheduler answers what is
    queued (within `grace_s`) and stops, then the engine and the preparation threads go.
    Whether the scheduler stopped in time."""
    loop = asyncio.get_running_loop()
    drained = await loop.run_in_executor(None, stack.scheduler.drain, grace_s)
    if drained:  # a stuck engine thread still holds the engine: closing it could hang too
        stack.engine.close()
    stack.service.executor.shutdown(wait=False)
    return drained


async def stop_front_ends(
    stack: Stack,
    server: grpc.aio.Server,
    runner: web.AppRunner | None,
    grace_s: float,
    delay_s: float = 0.0,
) -> None:
    """The drain's first half: not ready, health NOT_SERVING, then (`delay_s` later, for load
    balancers to notice) both front ends refuse new calls and answer those in flight, within
    one grace period. The scheduler keeps running until they have."""
    stack.ready = False
    await set_serving(health_of(server), False)
    await asyncio.sleep(delay_s)  # both front ends still take calls meanwhile
    stack.accepting = False
    stopping = [server.stop(grace_s)] + ([runner.cleanup()] if runner is not None else [])
    await asyncio.gather(*stopping)
    if stack.service.fetcher is not None:  # no call is left to fetch for
        await stack.service.fetcher.close()


def create_server(config: ServerConfig, stack: Stack | None = None) -> tuple[grpc.aio.Server, int]:
    """A gRPC server for `config`, bound to `config.grpc_port` (0 picks a free port), not yet
    started. Without `stack` the model is loaded and warmed up first (blocking), so health
    reports SERVING from the start. Call it inside a running event loop; the scheduler is
    started here."""
    stack = stack or build_stack(config)
    stack.scheduler.start()
    server, port, health_servicer = build_server(
        config, stack.service, stack.info, stack.metrics, stack.tokens, stack.tls
    )
    _health[server] = health_servicer
    # No client can call before start(); the task is kept so it cannot be collected unrun.
    loop = asyncio.get_running_loop()
    _keep(loop.create_task(set_serving(health_servicer, True)))

    def not_serving() -> None:  # on the loop: load balancers stop sending calls here
        stack.ready = False
        _keep(loop.create_task(set_serving(health_servicer, False)))

    stack.scheduler.on_broken(lambda: loop.call_soon_threadsafe(not_serving))
    return server, port


def _keep(task: asyncio.Task[None]) -> None:
    """Hold a fire-and-forget task until it is done (the loop keeps only weak references)."""
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def health_of(server: grpc.aio.Server) -> Any:
    """The health servicer of a server made by `create_server` (to report NOT_SERVING)."""
    return _health[server]


_health: weakref.WeakKeyDictionary[grpc.aio.Server, Any] = weakref.WeakKeyDictionary()
_tasks: set[asyncio.Task[None]] = set()
