"""The gRPC server: a thin servicer over `ModerationService`, health, reflection, auth, TLS.

The servicer only converts protobuf ↔ dataclasses and maps errors to status codes
(`status.py`); batching, limits and preparation live in the service and scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from guardrt.runtime.errors import ConfigError, GuardrtError
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.convert import error_verdict, input_from_proto, result_to_proto
from guardrt.runtime.server.metrics import Metrics
from guardrt.runtime.server.refusals import log_refusal
from guardrt.runtime.server.service import (
    ModerationInput,
    ModerationResult,
    ModerationService,
    checked_request_id,
)
from guardrt.runtime.server.status import grpc_code, grpc_message, grpc_status, retry_pushback
from guardrt.runtime.server.streaming import StreamSession
from guardrt.runtime.server.tls import ServerTls
from guardrt.runtime.server.tokens import NOT_AUTHENTICATED, BearerTokens
from guardrt.runtime.server.trace import trace_id
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc

# The asyncio health servicer (grpc-stubs predates it, hence Any).
_health_aio: Any = importlib.import_module("grpc_health.v1.health").aio
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Moderation"].full_name  # guardrt.v1.Moderation


def _deadline(context: Any) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ModerationServicer(pb_grpc.ModerationServicer):
    def __init__(
        self,
        service: ModerationService,
        info: pb.ModelInfo,
        config: ServerConfig,
        metrics: Metrics | None = None,
        tokens: BearerTokens | None = None,
    ) -> None:
        self.service, self.info = service, info
        self.tokens = tokens or BearerTokens(config.auth_tokens, config.auth_token_file)
        self.metrics = metrics

    def _count(
        self,
        route: str,
        caller: str,
        outcome: ModerationResult | GuardrtError,
        request_id: str = "",
    ) -> None:
        """A verdict given or a call refused, on /metrics (and a refusal logged)."""
        if isinstance(outcome, ModerationResult):
            if self.metrics is not None:
                self.metrics.answered(route, outcome, grpc.StatusCode.OK.name, caller)
            return
        reason = getattr(outcome, "reason", None)
        label = reason.value if reason is not None else type(outcome).__name__
        code = grpc_status(outcome).name
        if self.metrics is not None:
            self.metrics.failed(route, code, label, caller)
        message = grpc_message(outcome, request_id)
        log_refusal(route, code, label, message, request_id or None, caller)

    async def _refuse(
        self,
        context: Any,
        route: str,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        caller: str = NOT_AUTHENTICATED,
    ) -> None:
        """End the call with `code`, counted under `route` and logged (abort raises)."""
        if self.metrics is not None:
            self.metrics.failed(route, code.name, reason, caller)
        log_refusal(route, code.name, reason, message, caller=caller)
        await context.abort(code, message)

    async def _authorize(self, context: Any, route: str) -> str:
        """The caller's name (tokens.py); a call without an accepted token is aborted."""
        metadata = dict(context.invocation_metadata() or ())
        caller = self.tokens.caller(str(metadata.get("authorization", "")))
        if caller is None:
            message = "a valid 'authorization: Bearer <token>' header is required"
            await self._refuse(
                context, route, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", message
            )
            raise AssertionError("not reached: abort raises")
        return caller

    async def Moderate(self, request: pb.ModerateRequest, context: Any) -> pb.ModerateResponse:  # noqa: N802
        route = "grpc/Moderate"
        caller = await self._authorize(context, route)
        request_id = ""
        try:
            request_id = checked_request_id(request.request_id)
            item = input_from_proto(request, self.service.origins)
            item = _with_id(item, request_id, caller, _trace(context))
            result = await self.service.moderate(item, _deadline(context))
        except GuardrtError as exc:
            self._count(route, caller, exc, request_id)
            await _abort(context, exc, request_id)
            raise  # not reached: abort raises
        self._count(route, caller, result)
        return result_to_proto(result)

    async def ModerateMany(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ModerateRequest], context: Any
    ) -> AsyncIterator[pb.ModerateResponse]:
        route = "grpc/ModerateMany"
        caller = await self._authorize(context, route)
        trace = _trace(context)  # the stream's, for each of its requests
        responses: asyncio.Queue[pb.ModerateResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()
        deadline = _deadline(context)
        # A stream's requests in flight (read, not yet answered) are bounded: the next is read
        # only when one is answered, so a client pushing a backlog is held by gRPC's flow
        # control instead of being refused RESOURCE_EXHAUSTED for most of it.
        window = asyncio.Semaphore(stream_window(self.service))

        async def one(request: pb.ModerateRequest) -> None:
            request_id = request.request_id  # echoed as sent, to match a refusal to its request
            try:
                request_id = checked_request_id(request.request_id)
                item = input_from_proto(request, self.service.origins)
                item = _with_id(item, request_id, caller, trace)
                # A bulk backlog past its share waits here: gRPC's flow control holds the rest.
                result = await self.service.moderate(item, deadline, hold=True)
                self._count(route, caller, result)
                response = result_to_proto(result)
            except GuardrtError as exc:
                self._count(route, caller, exc, request_id)
                verdict = error_verdict(grpc_message(exc, request_id), grpc_code(exc))
                response = pb.ModerateResponse(request_id=request_id, verdict=verdict)
            await responses.put(response)

        async def read() -> None:
            iterator = aiter(request_iterator)
            while True:
                await window.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(one(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.wait(set(pending))
            await responses.put(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await responses.get()) is not None:
                yield response
                window.release()
            await reader
        finally:  # the client went away: drop its queued work
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def ModerateStream(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        route = "grpc/ModerateStream"
        caller = await self._authorize(context, route)
        session: StreamSession | None = None
        deadline = _deadline(context)

        async def refuse(message: str) -> None:  # the stream's messages out of order
            await self._refuse(
                context, route, grpc.StatusCode.INVALID_ARGUMENT, "stream_protocol", message, caller
            )

        try:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if (session is None) != (kind == "start"):
                    problem = "must be a start" if session is None else "cannot be a second start"
                    await refuse(f"stream message {kind!r} {problem}")
                try:
                    if session is None:
                        session = await StreamSession.start(
                            self.service,
                            message.start,
                            deadline,
                            functools.partial(self._count, route, caller),  # each checkpoint
                            caller,
                            _trace(context),
                        )
                        # The start is accepted: said at once (headers), so that a client can
                        # wait for it and learn a refusal's status before it writes more.
                        await context.send_initial_metadata(((STREAM_STARTED, "1"),))
                    elif kind == "append":
                        for response in await session.append(message.append):
                            yield response
                            if response.final:
                                return
                    elif kind == "end":
                        yield await session.finish()
                        return
                    else:
                        await refuse("empty stream message")
                except GuardrtError as exc:
                    request_id = session.request_id if session else message.start.request_id
                    self._count(route, caller, exc, request_id)
                    await _abort(context, exc, request_id)
            if session is not None:
                await refuse("the stream closed without an end message")
        finally:  # ended, aborted or cancelled: the cache slot goes back
            if session is not None:
                session.close()

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.ModelInfo:  # noqa: N802
        await self._authorize(context, "grpc/GetInfo")
        return self.info


# The initial metadata ModerateStream sends once it has accepted the stream's start.
STREAM_STARTED = "guardrt-stream-started"


def stream_window(service: ModerationService) -> int:
    """How many of one ModerateMany stream's requests may be in flight: enough batches to
    keep the engine busy, within the queue's bound (room is left for other callers)."""
    scheduler = service.scheduler
    return max(1, min(scheduler.max_queue // 2, max(16, 4 * scheduler.max_batch)))


async def _abort(context: Any, error: GuardrtError, request_id: str) -> None:
    """End the call with the error's status and message, and when the caller may retry
    (`grpc-retry-pushback-ms`, which gRPC clients' retry policies wait for). Raises."""
    pushback = retry_pushback(error)
    if pushback:
        context.set_trailing_metadata(pushback)
    await context.abort(grpc_status(error), grpc_message(error, request_id))


def _with_id(item: ModerationInput, request_id: str, caller: str, trace: str) -> ModerationInput:
    """`item` with its id, its caller and the trace its call belongs to."""
    return dataclasses.replace(item, request_id=request_id, caller=caller, trace_id=trace)


def _trace(context: Any) -> str:
    """The trace id of the call's `traceparent` metadata ("" without a valid one)."""
    metadata = dict(context.invocation_metadata() or ())
    return trace_id(str(metadata.get("traceparent", "")))


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel options for `config`."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # gRPC's default SO_REUSEPORT lets a second server bind a port in use and take part
        # of its calls, silently: a port in use must be an error.
        ("grpc.so_reuseport", 0),
    ]


def new_health_servicer() -> Any:
    """grpc.health.v1's asyncio servicer (NOT_SERVING until `set_serving`)."""
    return _health_aio.HealthServicer()


def build_server(
    config: ServerConfig,
    service: ModerationService,
    info: pb.ModelInfo,
    metrics: Metrics | None = None,
    tokens: BearerTokens | None = None,
    tls: ServerTls | None = None,
) -> tuple[grpc.aio.Server, int, Any]:
    """An unstarted server with the moderation, health and reflection services, bound to
    `config.grpc_port` (0 picks a free port). Health reports NOT_SERVING until the caller
    marks it SERVING (after warm-up). With `config.tls`, `tls` (made from it when not given)
    is the certificate it presents, reloadable."""
    server = grpc.aio.server(options=grpc_options(config))
    servicer = ModerationServicer(service, info, config, metrics, tokens)
    pb_grpc.add_ModerationServicer_to_server(servicer, server)
    health_servicer = new_health_servicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    tls = None if config.tls is None else tls or ServerTls(config.tls)
    return server, bind(server, config, tls), health_servicer


def bind(server: grpc.aio.Server, config: ServerConfig, tls: ServerTls | None) -> int:
    """Bind `server` to config's gRPC port (0: a free one), over TLS with `tls`; the port. A
    port that cannot be bound is a ConfigError naming the address."""
    address = f"{config.host}:{config.grpc_port}"
    try:
        if tls is None:
            port: int = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.grpc_credentials())
    except RuntimeError as exc:  # grpcio's "Failed to bind to address ..."
        raise ConfigError(f"gRPC: cannot listen on {address} (in use, or not allowed)") from exc
    return port


async def set_serving(health_servicer: Any, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
