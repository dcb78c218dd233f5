"""The OpenAI-compatible HTTP API, in the gRPC server's process and event loop.

aiohttp: asyncio-native (it shares the loop, the scheduler and the engine with gRPC), streams
responses (SSE), bounds request bodies before reading them (`client_max_size` → 413), and does
nothing on the event loop but small bodies' JSON parsing (large ones, images in base64, are
decoded on a preparation thread): validation, tokenization and tiling run where gRPC's
do, and the model on the engine thread.

Routes: POST /v1/chat/completions, POST /v1/moderations, GET /v1/models, GET /healthz (alive),
GET /readyz (model loaded and warmed, not draining), GET /metrics (Prometheus).

While draining, /readyz says 503 at once; new moderation calls are taken for the drain delay
(as gRPC takes them), then refused (503 `shutting_down`, as gRPC refuses new calls
UNAVAILABLE); calls already in flight are answered. A caller that disconnects
cancels its call: queued work is dropped unrun. `X-Request-Timeout` (or the `openai` client's
`X-Stainless-Read-Timeout`) bounds how long a call may wait in the queue (504 `timeout`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from guardrt.runtime.errors import ConfigError, GuardrtError, ImageError, ImageUrlError, PromptError
from guardrt.runtime.model.resolve import TINY_RANDOM
from guardrt.runtime.scheduler import broken_error
from guardrt.runtime.server import openai_answers as answers
from guardrt.runtime.server import openai_compat as oa
from guardrt.runtime.server.api_errors import ApiError
from guardrt.runtime.server.chat_logprobs import choice_logprobs
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.server.metrics import Metrics
from guardrt.runtime.server.refusals import log_refusal
from guardrt.runtime.server.service import (
    ModerationService,
    checked_request_id,
)
from guardrt.runtime.server.status import (
    http_status,
    internal_message,
    retry_after_header,
    retry_after_s,
)
from guardrt.runtime.server.tls import ServerTls
from guardrt.runtime.server.tokens import NOT_AUTHENTICATED, BearerTokens
from guardrt.runtime.server.trace import trace_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN = frozenset({"/healthz", "/readyz", "/metrics"})  # no bearer token needed
_MODERATE = frozenset({"/v1/chat/completions", "/v1/moderations"})  # refused while draining
# The caller's id for a call (as OpenAI's API names it), echoed in the answer's header; made up
# when absent. Each moderation input's id is this one with "-<index>".
REQUEST_ID_HEADER = "X-Request-Id"


def _request_key(name: str) -> Any:
    """A key for a request's storage: aiohttp ≥ 3.14's typed `RequestKey` (a plain string
    there warns NotAppKeyWarning), a string before it."""
    make = getattr(web, "RequestKey", None)
    return name if make is None else make(name, object)


_REQUEST_ID_KEY = _request_key("guardrt.request_id")  # where a moderation call keeps its id
_CALLER_KEY = _request_key("guardrt.caller")  # its caller's name, once authenticated
# Where a moderation call keeps its parsed body, which places the runtime's input errors in it
# (`param`, and for /v1/moderations the message's `input[k]`).
_BODY_KEY = _request_key("guardrt.body")
_INPUT_ERRORS = (PromptError, ImageError)  # errors in the caller's input: they have a place
# Bodies up to this size are decoded on the event loop (under ~0.1 ms); larger ones, images
# in base64, on a preparation thread.
_INLINE_BODY_BYTES = 64 * 1024
_Parsed = TypeVar("_Parsed")


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}"[:300]) from exc
    except RecursionError as exc:  # arrays or objects nested thousands deep
        raise ApiError(400, "the body's JSON is nested too deeply to read") from exc


def served_model_id(model: str) -> str:
    """The id /v1/models lists: `tiny-random`, or the checkpoint directory's name."""
    return model if model == TINY_RANDOM else Path(model).name or model


def _error(error: ApiError, request_id: str | None = None) -> web.Response:
    """An error in OpenAI's shape, with the call's id when it has one (to find its log lines)."""
    headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = retry_after_header(error.retry_after_s)
    return web.json_response(error.body(), status=error.status, headers=headers)


def _request_id(request: web.Request) -> str:
    """The call's id from its header (made up when absent), kept on the request so that an
    error answer carries it too."""
    request_id = checked_request_id(request.headers.get(REQUEST_ID_HEADER, ""))
    request[_REQUEST_ID_KEY] = request_id
    return request_id


class HttpApi:
    def __init__(
        self,
        config: ServerConfig,
        service: ModerationService,
        metrics: Metrics,
        ready: Callable[[], bool],
        tokens: BearerTokens | None = None,
        accepting: Callable[[], bool] | None = None,
    ) -> None:
        """`ready`: what /readyz says; `accepting`: whether moderation calls are taken (the
        same as `ready` unless given: a drain delay takes calls while not ready)."""
        self.config, self.service, self.metrics, self.ready = config, service, metrics, ready
        self.accepting = accepting or ready
        self.tokens = tokens or BearerTokens(config.auth_tokens, config.auth_token_file)
        self.served = served_model_id(config.model)
        self.paths: frozenset[str] = frozenset()  # the routes' paths (build_http_app sets them)
        self.origins = service.origins  # where the service's fetcher may fetch images from

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error in OpenAI's shape; every answer counted by route, code and reason."""
        # Paths no route serves share one label: a label per path any caller sends would grow
        # the metrics without bound (a scanner's every probe a new series).
        route = request.path if request.path in self.paths else "unmatched"
        try:
            if request.path not in _OPEN:
                request[_CALLER_KEY] = self._authorize(request)
            if request.path in _MODERATE and self.service.scheduler.broken.is_set():
                raise broken_error()
            if request.path in _MODERATE and not self.accepting():
                raise ApiError(
                    503,
                    "the server is not accepting new requests (shutting down)",
                    type="server_error",
                    code="shutting_down",
                )
            response = await handler(request)
        except ApiError as exc:
            return self._refused(
                route, exc, request.get(_REQUEST_ID_KEY), caller=request.get(_CALLER_KEY)
            )
        except GuardrtError as exc:
            status, code = http_status(exc)
            request_id = request.get(_REQUEST_ID_KEY)
            body: oa.BodyPlaces | None = request.get(_BODY_KEY)
            placed = body if isinstance(exc, _INPUT_ERRORS) else None  # the caller's fault
            message = str(exc) if placed is None else placed.message(exc)
            param = None if placed is None else placed.param(exc.at)
            if isinstance(exc, ImageUrlError):  # a URL's place, as the body numbers it
                param = exc.where or None
            if status == 500:
                message = internal_message(request_id)
            kind = "server_error" if status >= 500 else "invalid_request_error"
            error = ApiError(status, message, kind, param, code, retry_after_s=retry_after_s(exc))
            return self._refused(route, error, request_id, caller=request.get(_CALLER_KEY))
        except web.HTTPRequestEntityTooLarge as exc:
            message = f"the request body is over the {self.body_limit()}-byte limit"
            error = ApiError(exc.status, message, code="request_too_large")
            caller = request.get(_CALLER_KEY)
            return self._refused(route, error, request.get(_REQUEST_ID_KEY), caller=caller)
        except web.HTTPException as exc:
            error = ApiError(exc.status, exc.reason, code=str(exc.status))
            request_id, caller = request.get(_REQUEST_ID_KEY), request.get(_CALLER_KEY)
            return self._refused(route, error, request_id, reason="http", caller=caller)
        return response

    def _refused(
        self,
        route: str,
        error: ApiError,
        request_id: str | None,
        reason: str | None = None,
        caller: str | None = None,
    ) -> web.Response:
        """The error's answer, counted on /metrics and logged (`reason`: the metrics' label,
        the error's code by default; `caller`: who sent it, once authenticated)."""
        reason = reason or error.code or error.type
        self.metrics.failed(route, str(error.status), reason, caller or NOT_AUTHENTICATED)
        log_refusal(route, str(error.status), reason, error.message, request_id, caller)
        return _error(error, request_id)

    def _authorize(self, request: web.Request) -> str:
        """The caller's name (tokens.py); 401 without an accepted token."""
        caller = self.tokens.caller(request.headers.get("Authorization", ""))
        if caller is None:
            raise ApiError(
                401,
                "a valid 'Authorization: Bearer <token>' header is required",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return caller

    def body_limit(self) -> int:
        # Images arrive base64-encoded in JSON: 4/3 of the binary limit, plus the text.
        return self.config.max_message_bytes * 4 // 3 + 1024 * 1024

    async def _parsed(self, request: web.Request, parse: Callable[[Any], _Parsed]) -> _Parsed:
        """`parse` of the JSON body. A large body (an image as base64: ~50 ms of JSON and
        base64 decoding for a 10 MB photo) is decoded on a preparation thread, so that it does
        not stall the event loop every other call's answer waits on."""
        self.service.check_room()  # a full queue refuses before the body is read
        raw = await request.read()
        if len(raw) <= _INLINE_BODY_BYTES:
            return parse(_loads(raw))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.service.executor, lambda: parse(_loads(raw)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        request_id = _request_id(request)
        deadline = oa.request_deadline(request.headers, time.monotonic())
        caller = request[_CALLER_KEY]
        chat = await self._parsed(
            request, lambda data: oa.parse_chat(data, self.served, request_id, self.origins)
        )
        request[_BODY_KEY] = chat
        trace = trace_id(request.headers.get("traceparent"))
        item = dataclasses.replace(chat.item, caller=caller, trace_id=trace)
        result = await self.service.moderate(item, deadline)
        self.metrics.answered(request.path, result, caller=caller)
        created = answers.now()
        bulk = chat.item.bulk
        logprobs = None
        if chat.item.top_logprobs is not None:
            token_bytes = self.service.preparer.tokenizer.token_bytes
            logprobs = choice_logprobs(result.token_logprobs, token_bytes)
        if not chat.stream:
            body = answers.chat_completion(result, chat.model, created, bulk, logprobs)
            return web.json_response(body, headers={REQUEST_ID_HEADER: request_id})
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                REQUEST_ID_HEADER: request_id,
            }
        )
        await response.prepare(request)
        for chunk in answers.chat_chunks(
            result, chat.model, created, bulk, logprobs, chat.include_usage
        ):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        request_id = _request_id(request)
        deadline = oa.request_deadline(request.headers, time.monotonic())
        inputs = await self._parsed(
            request,
            lambda data: oa.parse_moderations(data, self.served, request_id, self.origins),
        )
        request[_BODY_KEY] = inputs
        caller = request[_CALLER_KEY]
        trace = trace_id(request.headers.get("traceparent"))
        items = [dataclasses.replace(item, caller=caller, trace_id=trace) for item in inputs.items]
        # A list of bulk inputs past the bulk share waits for room (the body is read already).
        results = await self.service.moderate_all(items, deadline, hold=True)
        for result in results:
            self.metrics.answered(request.path, result, caller=caller)
        body = [
            answers.moderation_result(result, types, inputs.custom or self.service.policy.custom)
            for result, types in zip(results, inputs.types, strict=True)
        ]
        answer = answers.moderations_response(request_id, inputs.model, body)
        return web.json_response(answer, headers={REQUEST_ID_HEADER: request_id})

    async def models(self, request: web.Request) -> web.StreamResponse:
        created = answers.now()
        ids = [self.served, *oa.ALIASES]
        data = [
            {"id": i, "object": "model", "created": created, "owned_by": "guardrt"} for i in ids
        ]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.StreamResponse:
        """One model (the `openai` client's `models.retrieve`): the served id or an alias;
        404 `model_not_found` otherwise."""
        model = oa.check_model(request.match_info["model"], self.served)
        body = {"id": model, "object": "model", "created": answers.now(), "owned_by": "guardrt"}
        return web.json_response(body)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        ready = self.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.text(), content_type="text/plain", charset="utf-8")


def build_http_app(
    config: ServerConfig,
    service: ModerationService,
    metrics: Metrics,
    ready: Callable[[], bool],
    tokens: BearerTokens | None = None,
    accepting: Callable[[], bool] | None = None,
) -> web.Application:
    api = HttpApi(config, service, metrics, ready, tokens, accepting)
    app = web.Application(middlewares=[api.errors], client_max_size=api.body_limit())
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_post("/v1/moderations", api.moderations)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model:.+}", api.model)  # ids hold a slash
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics_text)
    api.paths = frozenset(resource.canonical for resource in app.router.resources())
    return app


async def start_http(
    app: web.Application,
    host: str,
    port: int,
    grace_s: float = 30.0,
    tls: ServerTls | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = a free port), over TLS with `tls` (HTTPS: the gRPC
    server's certificate, reloaded with it); returns the runner and the bound port.
    `runner.cleanup()` stops accepting and gives calls in flight up to `grace_s` to finish."""
    # handler_cancellation: a caller that disconnects cancels its handler, which takes its
    # work out of the queue (aiohttp's default lets abandoned work run).
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=grace_s
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context if tls else None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"HTTP API: cannot listen on {host}:{port}: {exc.strerror}") from exc
    sockets = getattr(site._server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
