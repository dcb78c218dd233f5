"""A Python client for a guardrt server over gRPC: the same messages and `Verdict` as `Guard`.

    from guardrt.client import ModerationClient

    with ModerationClient("guard.internal:50051", token="…", tls_ca="ca.pem") as client:
        verdict = client.moderate([{"role": "user", "content": "How do I pick a lock?"}])
        verdict.label, verdict.categories, verdict.unsafe_probability

Needs only grpcio and protobuf (no torch, no model). Messages take the Python API's format:
`content` is a string or a list of `{"type": "text", "text": …}` / `{"type": "image",
"image": …}` parts, an image being encoded bytes, a path, or a PIL image, or `{"type":
"image_url", "image_url": "https://…"}` for the server to fetch (from the origins it was
started with, `--image-url-origins`; OpenAI's `{"url": …}` object is taken too). A call the server
refuses raises `CallError` with its gRPC status code; calls refused at once because the
server is busy or stopping (RESOURCE_EXHAUSTED, UNAVAILABLE: never run) are retried with
backoff first. A safety verdict is never made up here: every failure raises, or is an `error`
verdict in `moderate_many`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from guardrt.runtime.errors import ConfigError, GuardrtError
from guardrt.runtime.verdict import Label, Verdict
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc

_ROLES = {"user": pb.USER, "assistant": pb.ASSISTANT}
_LABELS = {pb.SAFE: Label.SAFE, pb.UNSAFE: Label.UNSAFE, pb.ERROR: Label.ERROR}
_SERVICE = "guardrt.v1.Moderation"
_STREAM_STARTED = "guardrt-stream-started"  # ModerateStream's headers once its start is taken


class CallError(GuardrtError):
    """A call the server refused or failed: `code` is its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def _retry_config(retries: int) -> str:
    """gRPC's own retries (service config): only for calls refused before they ran."""
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    config = {"methodConfig": [{"name": [{"service": _SERVICE}], "retryPolicy": policy}]}
    return json.dumps(config)


def _read(what: str, value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {value}: {exc.strerror}") from exc


def _channel_settings(
    tls_ca: str | os.PathLike[str] | bytes | None,
    tls_cert: str | os.PathLike[str] | bytes | None,
    tls_key: str | os.PathLike[str] | bytes | None,
    retries: int,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """The channel's credentials (None: plaintext) and options, checked."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("tls_cert and tls_key go together")
    if tls_cert is not None and tls_ca is None:
        raise ConfigError("a client certificate needs tls_ca (the CA that verifies the server)")
    if retries < 0:
        raise ConfigError(f"retries must be ≥ 0, not {retries}")
    options: list[tuple[str, Any]] = [("grpc.enable_retries", int(retries > 0))]
    if retries > 0:  # gRPC wants at least 2 attempts in a retry policy
        options.append(("grpc.service_config", _retry_config(retries)))
    if tls_ca is None:
        return None, options
    credentials = grpc.ssl_channel_credentials(
        _read("tls_ca", tls_ca), _read("tls_key", tls_key), _read("tls_cert", tls_cert)
    )
    return credentials, options


def _metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class _Client:
    """What both clients hold: a channel to one server with its credentials, retry policy,
    bearer token and deadline."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | bytes | None = None,
        tls_cert: str | os.PathLike[str] | bytes | None = None,
        tls_key: str | os.PathLike[str] | bytes | None = None,
        timeout: float | None = 30.0,
        retries: int = 3,
    ) -> None:
        credentials, options = _channel_settings(tls_ca, tls_cert, tls_key, retries)
        self.channel: Any = self._open(target, credentials, options)
        self.stub = pb_grpc.ModerationStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout

    @staticmethod
    def _open(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        raise NotImplementedError


class ModerationClient(_Client):
    """A channel to one server (`target`: host:port). `tls_ca` (PEM bytes or a file) turns
    TLS on; `tls_cert`/`tls_key` add a client certificate (mutual TLS); `token` is sent as
    `authorization: Bearer …`. `timeout` is each call's deadline in seconds (None: none);
    `retries` how often a call refused at once (busy or stopping server) is tried again."""

    @staticmethod
    def _open(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def __enter__(self) -> ModerationClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def moderate(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        categories: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        excluded_categories: Iterable[str] = (),
        request_id: str = "",
        bulk: bool = False,
        unsafe_threshold: float | None = None,
    ) -> Verdict:
        """The verdict on the last message of `messages`, as `Guard.moderate` gives it; a
        refused call raises CallError (INVALID_ARGUMENT names the offending part). `bulk`:
        run after interactive requests (refused RESOURCE_EXHAUSTED, after the retries, while
        bulk requests fill their share of the server's queue). `unsafe_threshold`: `unsafe`
        when P(unsafe) ≥ it (`Policy.unsafe_threshold`; default: the server's)."""
        request = moderate_request(
            messages, categories, excluded_categories, request_id, bulk, unsafe_threshold
        )
        return verdict_from_proto(self.call(request).verdict)

    def call(self, request: pb.ModerateRequest) -> pb.ModerateResponse:
        """The whole response to one request (timing and prompt length with the verdict)."""
        try:
            response: pb.ModerateResponse = self.stub.Moderate(
                request, timeout=self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise CallError(exc.code(), str(exc.details())) from exc
        return response

    def moderate_many(
        self, requests: Iterable[pb.ModerateRequest]
    ) -> Iterator[tuple[str, Verdict]]:
        """(request_id, verdict) for each request (`moderate_request` makes them; give each
        its own id), as each completes: one stream for many requests, held back by the
        server when it is busy. A request the server refused is an `error` verdict naming
        why; a failure of the whole stream raises CallError."""
        try:
            for response in self.stub.ModerateMany(
                iter(requests), timeout=self.timeout, metadata=self.metadata
            ):
                yield response.request_id, verdict_from_proto(response.verdict)
        except grpc.RpcError as exc:
            raise CallError(exc.code(), str(exc.details())) from exc

    def info(self) -> pb.ModelInfo:
        """What the server serves: model, precision, limits, default policy."""
        try:
            info: pb.ModelInfo = self.stub.GetInfo(
                pb.GetInfoRequest(), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise CallError(exc.code(), str(exc.details())) from exc
        return info


def moderate_request(
    messages: Sequence[Mapping[str, Any]],
    categories: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    excluded_categories: Iterable[str] = (),
    request_id: str = "",
    bulk: bool = False,
    unsafe_threshold: float | None = None,
) -> pb.ModerateRequest:
    """A ModerateRequest from the Python API's messages and policy (ConfigError, naming the
    message and part, for what cannot be sent; the server checks the rest). `bulk`: a
    backlog's request, run after interactive ones (`Priority` in the proto);
    `unsafe_threshold`: the request's decision threshold (None: the server's)."""
    pairs = list(categories.items()) if isinstance(categories, Mapping) else categories or []
    policy = pb.Policy(
        exclude=list(excluded_categories),
        categories=[pb.Category(code=code, description=text) for code, text in pairs],
        unsafe_threshold=unsafe_threshold,
    )
    return pb.ModerateRequest(
        request_id=request_id,
        messages=messages_to_proto(messages),
        policy=policy,
        priority=pb.BULK if bulk else pb.INTERACTIVE,
    )


def messages_to_proto(messages: Sequence[Mapping[str, Any]]) -> list[pb.Message]:
    converted = []
    for index, message in enumerate(messages):
        where = f"message {index}"
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
            role = message.get("role") if isinstance(message, Mapping) else None
            raise ConfigError(f"{where}: role must be 'user' or 'assistant', not {role!r}")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, Sequence):
            raise ConfigError(f"{where}: content must be a string or a list of parts")
        converted.append(
            pb.Message(
                role=_ROLES[message["role"]],
                content=[_part(part, f"{where} part {i}") for i, part in enumerate(parts)],
            )
        )
    return converted


def _part(part: Any, where: str) -> pb.Content:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return pb.Content(text=part["text"])
    if kind == "image":
        return pb.Content(image=_image_bytes(part.get("image"), where))
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{where}: an image_url part needs its URL, a non-empty string")
        return pb.Content(image_url=url)
    raise ConfigError(
        f"{where}: a part is {{'type': 'text', 'text': str}}, an image or an image_url part"
    )


def _image_bytes(image: Any, where: str) -> bytes:
    """Encoded bytes as given, a file's bytes, or a PIL image encoded as PNG (lossless)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read image {image}: {exc.strerror}") from exc
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ConfigError(
        f"{where}: an image is encoded bytes, a path or a PIL image, not {type(image).__name__}"
    )


def verdict_from_proto(verdict: pb.Verdict) -> Verdict:
    """The runtime's Verdict; a label this client does not know is an error verdict (a
    newer server's label must never read as safe)."""
    label = _LABELS.get(verdict.label, Label.ERROR)
    error = verdict.error or None
    if label is Label.ERROR and error is None:
        error = f"the server answered label {verdict.label}, which this client does not know"
    computed = label is not Label.ERROR or verdict.error_code == 0
    return Verdict(
        label=label,
        categories=list(verdict.categories),
        raw_output=verdict.raw_output,
        error=error,
        unsafe_probability=verdict.unsafe_probability if computed else math.nan,
        # A proto map has no order: by code number, as policies list them (S1..S999).
        category_probabilities=dict(
            sorted(verdict.category_probabilities.items(), key=lambda item: _code_number(item[0]))
        ),
        label_probability=verdict.label_probability or math.nan,
    )


def _code_number(code: str) -> tuple[int, str]:
    digits = code[1:]
    return (int(digits), code) if digits.isdigit() else (1_000_000, code)


class AsyncModerationClient(_Client):
    """`ModerationClient` for asyncio services (grpc.aio): the same settings, messages,
    verdicts and errors, awaited; it never blocks the caller's event loop."""

    @staticmethod
    def _open(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def __aenter__(self) -> AsyncModerationClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close(None)

    async def moderate(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        categories: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        excluded_categories: Iterable[str] = (),
        request_id: str = "",
        bulk: bool = False,
        unsafe_threshold: float | None = None,
    ) -> Verdict:
        """As `ModerationClient.moderate`, awaited."""
        request = moderate_request(
            messages, categories, excluded_categories, request_id, bulk, unsafe_threshold
        )
        return verdict_from_proto((await self.call(request)).verdict)

    async def call(self, request: pb.ModerateRequest) -> pb.ModerateResponse:
        try:
            response: pb.ModerateResponse = await self.stub.Moderate(
                request, timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code(), str(exc.details())) from exc
        return response

    async def moderate_many(
        self, requests: Iterable[pb.ModerateRequest] | AsyncIterable[pb.ModerateRequest]
    ) -> AsyncIterator[tuple[str, Verdict]]:
        """As `ModerationClient.moderate_many`: (request_id, verdict) as each completes."""
        source = aiter(requests) if isinstance(requests, AsyncIterable) else iter(requests)
        call = self.stub.ModerateMany(source, timeout=self.timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield response.request_id, verdict_from_proto(response.verdict)
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code(), str(exc.details())) from exc

    async def info(self) -> pb.ModelInfo:
        try:
            info: pb.ModelInfo = await self.stub.GetInfo(
                pb.GetInfoRequest(), timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code(), str(exc.details())) from exc
        return info

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        check_every_tokens: int = 32,
        stop_on_unsafe: bool = False,
        categories: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        excluded_categories: Iterable[str] = (),
        request_id: str = "",
        unsafe_threshold: float | None = None,
    ) -> AnswerStream:
        """Check an assistant answer while it is generated (ModerateStream): `messages` is the
        conversation before the answer (ending with a user message). Use it as `async with`;
        `append` the answer's text as it comes, read `checks` (or `unsafe`), and `end` for the
        final verdict on the whole answer."""
        if check_every_tokens < 1:
            raise ConfigError(f"check_every_tokens must be ≥ 1, not {check_every_tokens}")
        request = moderate_request(
            messages, categories, excluded_categories, request_id, False, unsafe_threshold
        )
        start = pb.StreamStart(
            request_id=request.request_id,
            messages=request.messages,
            policy=request.policy,
            check_every_tokens=check_every_tokens,
            stop_on_unsafe=stop_on_unsafe,
        )
        # Without a request iterator the call is written to.
        call = self.stub.ModerateStream(timeout=self.timeout, metadata=self.metadata)
        return AnswerStream(call, start)


@dataclass(frozen=True)
class StreamCheck:
    """One checkpoint's verdict: on the answer's first `covered_chars` characters
    (`covered_tokens` tokens); `final` for the verdict on the whole answer (or the one that
    stopped the stream at UNSAFE with stop_on_unsafe)."""

    verdict: Verdict
    covered_chars: int
    covered_tokens: int
    final: bool


class AnswerStream:
    """An answer being checked (`AsyncModerationClient.stream`)."""

    def __init__(self, call: Any, start: pb.StreamStart) -> None:
        self._call, self._start = call, start
        self.checks: list[StreamCheck] = []  # every checkpoint's verdict so far
        self.final: StreamCheck | None = None
        self._failure: CallError | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AnswerStream:
        await self._write(pb.StreamRequest(start=self._start))
        # The server sends its headers once it has accepted the start; a refused start ends
        # the call instead: its status is raised here, before anything else is written.
        headers = await self._call.initial_metadata()
        if not any(key == _STREAM_STARTED for key, _ in headers or ()):
            code = await self._call.code()  # the call's end: why it was refused
            raise CallError(code, str(await self._call.details()))
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.final is None:  # left before the end: the server gives the cache slot back
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    @property
    def unsafe(self) -> bool:
        """Whether a checkpoint so far judged the answer unsafe."""
        return any(check.verdict.label is Label.UNSAFE for check in self.checks)

    async def append(self, text: str) -> None:
        """Send more of the answer (any split). After the stream stopped at UNSAFE
        (stop_on_unsafe) there is nothing more to check: the text is not sent."""
        self._raise_failure()
        if self.final is None:
            await self._write(pb.StreamRequest(append=text))

    async def end(self) -> StreamCheck:
        """The answer is complete: the final verdict on all of it."""
        self._raise_failure()
        if self.final is None:
            await self._write(pb.StreamRequest(end=pb.StreamEnd()))
            await self._call.done_writing()
            if self._reader is not None:
                await self._reader
        self._raise_failure()
        if self.final is None:
            raise CallError(grpc.StatusCode.UNKNOWN, "the stream ended without a final verdict")
        return self.final

    async def _write(self, request: pb.StreamRequest) -> None:
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # The server ended the call (a refusal): its status says why, not the write's
            # own error ("Internal error from Core").
            if self._reader is not None:
                await self._reader
            self._raise_failure()
            code = await self._call.code()
            raise CallError(code, str(await self._call.details())) from exc

    async def _read(self) -> None:
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                check = StreamCheck(
                    verdict_from_proto(response.verdict),
                    response.covered_chars,
                    response.covered_tokens,
                    response.final,
                )
                self.checks.append(check)
                if check.final:
                    self.final = check
        except grpc.aio.AioRpcError as exc:
            self._failure = CallError(exc.code(), str(exc.details()))

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure
