"""The ports while the model loads (`--listen-while-loading`): alive, not ready, calls refused.

Loading Llama Guard 3 11B and warming it up (kernel choices measured, CUDA graphs captured)
takes minutes, and by default nothing listens meanwhile. A platform that probes liveness during
that time (a Kubernetes livenessProbe without a startupProbe long enough) restarts the server
before it ever serves. With this option the ports are bound before the load and answer what a
loading server should:

- gRPC: health NOT_SERVING (overall and for `guardrt.v1.Moderation`); every Moderation call is
  refused UNAVAILABLE at once ("the model is loading", with `grpc-retry-pushback-ms` so that a
  client's retry policy waits a while), never read or queued;
- HTTP: `/healthz` 200 (`{"status": "loading"}`: the process is alive), `/readyz` 503, `/metrics`
  (`guardrt_ready 0`, `guardrt_loading 1`), anything else 503 `loading` with `Retry-After`.

Nothing is accepted, so nothing is lost. Once the model is warmed, these listeners close and the
real servers bind the same ports (a few milliseconds without a listener: readiness still says
not ready then). Off by default: a load balancer that checks a port by connecting to it (a TCP
health check) would send calls to a server that refuses all of them until it has loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.grpc_server import (
    SERVICE_NAME,
    bind,
    grpc_options,
    new_health_servicer,
    set_serving,
)
from guardrt.runtime.server.http_server import start_http
from guardrt.runtime.server.refusals import log_refusal
from guardrt.runtime.server.status import pushback_metadata, retry_after_header
from guardrt.runtime.server.tls import ServerTls
from guardrt.v1 import moderation_pb2 as pb

# How long a client is asked to wait before trying again (gRPC retry pushback, Retry-After).
RETRY_AFTER_S = 2
_REASON = "loading"


class LoadingPorts:
    """The two listeners of a loading server; `close` before the real servers bind."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.grpc_server: grpc.aio.Server | None = None
        self.http_runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = -1

    def message(self) -> str:
        so_far = time.monotonic() - self.started
        return f"the model is loading ({so_far:.0f} s so far): retry in a few seconds"

    @classmethod
    async def open(cls, config: ServerConfig, tls: ServerTls | None) -> LoadingPorts:
        """Bind config's ports (0: a free one; `grpc_port`/`http_port` say which), with TLS as
        the real servers will present it. A port that cannot be bound is a ConfigError, and
        nothing is left listening."""
        ports = cls(time.monotonic())
        try:
            await ports._open_grpc(config, tls)
            if config.http_port >= 0:
                app = _http_app(ports)
                ports.http_runner, ports.http_port = await start_http(
                    app, config.host, config.http_port, 0.0, tls
                )
        except BaseException:
            await ports.close()
            raise
        return ports

    async def _open_grpc(self, config: ServerConfig, tls: ServerTls | None) -> None:
        server = grpc.aio.server(options=grpc_options(config))
        server.add_generic_rpc_handlers((_Refusing(self),))
        health = new_health_servicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.grpc_port = bind(server, config, tls)
        await set_serving(health, False)
        await server.start()
        self.grpc_server = server

    def bound(self, config: ServerConfig) -> ServerConfig:
        """`config` with the ports these listeners hold (a port 0 made concrete), for the real
        servers to bind the same ones."""
        return dataclasses.replace(config, grpc_port=self.grpc_port, http_port=self.http_port)

    async def close(self) -> None:
        """Stop both listeners at once (calls to them are refused as soon as they arrive)."""
        stopping: list[Any] = []
        if self.grpc_server is not None:
            stopping.append(self.grpc_server.stop(None))
        if self.http_runner is not None:
            stopping.append(self.http_runner.cleanup())
        self.grpc_server, self.http_runner = None, None
        await asyncio.gather(*stopping)

    def describe(self, host: str) -> str:
        http = "" if self.http_port < 0 else f" and {host}:{self.http_port} (HTTP)"
        return (
            f"listening on {host}:{self.grpc_port} (gRPC){http} while loading: health "
            "NOT_SERVING, /healthz alive, /readyz 503; calls refused UNAVAILABLE / 503 until loaded"
        )


class _Refusing(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Every method of guardrt.v1.Moderation, refused UNAVAILABLE without reading a message
    (streaming ones too); other unknown methods stay UNIMPLEMENTED."""

    def __init__(self, ports: LoadingPorts) -> None:
        self.ports = ports
        service = pb.DESCRIPTOR.services_by_name["Moderation"]
        self.methods = {
            f"/{SERVICE_NAME}/{method.name}": method.client_streaming or method.server_streaming
            for method in service.methods
        }

    async def _refuse(self, route: str, context: Any) -> None:
        message = self.ports.message()
        log_refusal(route, grpc.StatusCode.UNAVAILABLE.name, _REASON, message)
        context.set_trailing_metadata(pushback_metadata(RETRY_AFTER_S))
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    def service(self, handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        if method not in self.methods:
            return None
        route = "grpc/" + method.rsplit("/", 1)[-1]

        async def unary(request: bytes, context: Any) -> None:
            await self._refuse(route, context)

        async def stream(requests: Any, context: Any) -> None:
            await self._refuse(route, context)

        if self.methods[method]:  # streaming: refused before its first message is read
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


def _http_app(ports: LoadingPorts) -> web.Application:
    registry = CollectorRegistry()
    ready = Gauge(
        "guardrt_ready",
        "1 while the server takes work (loaded and warmed); 0 while loading, draining or once "
        "its engine is broken, as /readyz and gRPC health say.",
        registry=registry,
    )
    ready.set(0)
    loading = Gauge(
        "guardrt_loading",
        "1 while the model loads (--listen-while-loading); the series ends once it has loaded.",
        registry=registry,
    )
    loading.set(1)

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz" and request.method == "GET":
            return web.json_response({"status": "loading"})
        if request.path == "/readyz" and request.method == "GET":
            return web.json_response({"ready": False, "status": "loading"}, status=503)
        if request.path == "/metrics" and request.method == "GET":
            body = generate_latest(registry)
            return web.Response(body=body, content_type="text/plain", charset="utf-8")
        message = ports.message()
        log_refusal(request.path[:100], "503", _REASON, message)
        error = {"message": message, "type": "server_error", "param": None, "code": _REASON}
        return web.json_response(
            {"error": error}, status=503, headers={"Retry-After": retry_after_header(RETRY_AFTER_S)}
        )

    # No body is read: a large one is refused as soon as its headers are in.
    app = web.Application(client_max_size=1024)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app
