"""An in-process gRPC server on its own event-loop thread, and engines for server tests."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import grpc

from guardrt.runtime.engine import EngineInfo
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.http_server import build_http_app, start_http
from guardrt.runtime.server.main import (
    Stack,
    assemble_stack,
    create_server,
    health_of,
    stop_front_ends,
)
from guardrt.v1 import moderation_pb2_grpc as pb_grpc

UNSAFE_S1 = (271, 39257, 198, 50, 16, 128009)  # "\n\nunsafe\nS1<|eot_id|>"
SAFE = (271, 19193, 128009)


class FakeEngine:
    """Answers every request with a fixed output; can hold batches at a gate or fail."""

    def __init__(self, generated: tuple[int, ...] = SAFE, max_batch: int = 4) -> None:
        self.info = EngineInfo("fake", "cpu", "fp32", "meta", "constrained", max_batch, 1024)
        self.generated = generated
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # set when a batch reaches execute
        self.fail = False
        self.batches: list[list[PreparedRequest]] = []
        self.label_probability = 0.99  # P(safe) + P(unsafe), as Llama Guard's

    def warmup(self, sample: Sequence[PreparedRequest]) -> None:
        self.execute(sample)

    def execute(self, batch: Sequence[PreparedRequest]) -> list[Decoded]:
        self.batches.append(list(batch))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access (internal detail)")
        return [
            Decoded(
                r,
                self.generated,
                0.25,
                {c: 1 / len(r.grammar.codes) for c in r.grammar.codes},
                label_probability=self.label_probability,
            )
            for r in batch
        ]

    def open_session(self) -> int | None:
        return None

    def close_session(self, session: int) -> None:
        pass

    def close(self) -> None:
        pass


class ServerThread:
    """Serves a stack's service on a free port from a background event loop."""

    def __init__(self, stack: Stack, config: ServerConfig) -> None:
        self.stack, self.config = stack, config
        self.port = self.http_port = 0
        self.delay = 0.0
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.health: Any = None
        self.server: Any = None

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self.server, self.port = create_server(self.config, self.stack)
        self.health = health_of(self.server)
        await self.server.start()
        stack = self.stack
        app = build_http_app(
            self.config,
            stack.service,
            stack.metrics,
            self._ready,
            stack.tokens,
            accepting=lambda: self.stack.accepting,
        )
        runner, self.http_port = await start_http(
            app, "localhost", 0, self.config.grace_s, stack.tls
        )
        self._started.set()
        await self._stop.wait()
        await stop_front_ends(self.stack, self.server, runner, self.config.grace_s, self.delay)

    def _ready(self) -> bool:
        return self.stack.ready

    @property
    def base_url(self) -> str:
        return f"http://localhost:{self.http_port}/v1"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._started.wait(30), "the server did not start"
        return self

    def stop(self, delay: float = 0.0) -> None:
        """Begin the drain (health NOT_SERVING, `delay` s later server.stop(grace)); returns
        at once."""
        assert self._loop is not None
        assert self._stop is not None
        self.delay = delay
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread.is_alive():
            self.stop()
        self._thread.join(30)

    def channel(self, **options: Any) -> grpc.Channel:
        return grpc.insecure_channel(f"localhost:{self.port}", **options)

    def stub(self) -> pb_grpc.ModerationStub:
        return pb_grpc.ModerationStub(self.channel())


@contextmanager
def serving(
    engine: Any, preparer: Preparer, warmup: Sequence[PreparedRequest] = (), **settings: Any
) -> Iterator[ServerThread]:
    """A server on `engine`; `warmup`'s first request is the engine's self-check (none by
    default: an engine failure then never takes the server out of service)."""
    base = ServerConfig(grpc_port=0, host="localhost", grace_s=5.0)
    config = dataclasses.replace(base, **settings)
    stack = assemble_stack(config, engine, preparer, "test-model", list(warmup))
    try:
        with ServerThread(stack, config) as server:
            yield server
    finally:
        stack.scheduler.drain(10)
