"""Every error class → its gRPC status code, in one place (HTTP codes come with the HTTP API)."""

from __future__ import annotations

import math

import grpc

from guardrt.runtime.errors import (
    ConfigError,
    GuardrtError,
    ImageError,
    ImageUrlError,
    ImageUrlReason,
    PromptError,
    ServiceError,
    ServiceReason,
)

_SERVICE = {
    ServiceReason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ServiceReason.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ServiceReason.DRAINING: grpc.StatusCode.UNAVAILABLE,
    ServiceReason.ENGINE: grpc.StatusCode.INTERNAL,
    ServiceReason.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ServiceReason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ServiceReason.BROKEN: grpc.StatusCode.UNAVAILABLE,
    ServiceReason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def grpc_status(error: GuardrtError) -> grpc.StatusCode:
    if isinstance(error, ImageUrlError):  # the image's server failing may pass: a retry can do
        unavailable = error.reason is ImageUrlReason.UNAVAILABLE
        return grpc.StatusCode.UNAVAILABLE if unavailable else grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, PromptError | ImageError | ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, ServiceError):
        return _SERVICE[error.reason]
    return grpc.StatusCode.INTERNAL


def grpc_code(error: GuardrtError) -> int:
    """The numeric status code (for errors carried in-band, as `Verdict.error_code`)."""
    code: int = grpc_status(error).value[0]
    return code


def internal_message(request_id: str | None) -> str:
    """What a failure of ours says (both APIs): no internals, only the request whose id finds
    the server's log lines."""
    on = f" on request {request_id}" if request_id else ""
    return f"internal error{on}; the server log has details"


def grpc_message(error: GuardrtError, request_id: str) -> str:
    """The status message: the error's own (it names values, never content); engine failures
    say only which request failed, no internals."""
    if isinstance(error, ServiceError) and error.reason is ServiceReason.ENGINE:
        return internal_message(request_id)
    return str(error)


_HTTP = {
    ServiceReason.QUEUE_FULL: (429, "server_overloaded"),
    ServiceReason.DEADLINE: (504, "timeout"),
    ServiceReason.DRAINING: (503, "shutting_down"),
    ServiceReason.ENGINE: (500, "internal_error"),
    ServiceReason.TOO_LARGE: (413, "request_too_large"),
    ServiceReason.UNAUTHENTICATED: (401, "invalid_api_key"),
    ServiceReason.BROKEN: (503, "engine_unavailable"),
    ServiceReason.RATE_LIMITED: (429, "rate_limit_exceeded"),  # OpenAI's code for it
}


def http_status(error: GuardrtError) -> tuple[int, str]:
    """(HTTP status, OpenAI error code) of an error."""
    if isinstance(error, ImageUrlError):
        return error.status, error.code
    if isinstance(error, PromptError | ImageError | ConfigError):
        reason = getattr(error, "reason", None)
        return 400, str(reason.value) if reason is not None else "invalid_value"
    if isinstance(error, ServiceError):
        return _HTTP[error.reason]
    return 500, "internal_error"


def retry_after_s(error: GuardrtError) -> float | None:
    """When the caller may retry, where the error knows it (a caller past its rate)."""
    return error.retry_after_s if isinstance(error, ServiceError) else None


def retry_pushback(error: GuardrtError) -> tuple[tuple[str, str], ...]:
    """gRPC trailing metadata telling a client's retry policy when to retry (none unknown)."""
    seconds = retry_after_s(error)
    return () if seconds is None else pushback_metadata(seconds)


def pushback_metadata(seconds: float) -> tuple[tuple[str, str], ...]:
    """gRPC's `grpc-retry-pushback-ms` trailing metadata: whole ms, rounded up (at least 1)."""
    return (("grpc-retry-pushback-ms", str(max(1, math.ceil(seconds * 1000)))),)


def retry_after_header(seconds: float) -> str:
    """HTTP's Retry-After: whole seconds, rounded up (at least 1)."""
    return str(max(1, math.ceil(seconds)))
