"""A log line for every call the servers refuse or fail, beside its count on /metrics: the
request id a caller quotes finds the line (route, status, reason and the message it got).

Messages name an index, key, size or code, never request text, so they may be logged. Refusals
of an overloaded or stopping server (queue full, draining, engine broken) and of a caller past
its rate can come by the thousand a second: they are logged at DEBUG, their counts on /metrics
say enough.
"""

from __future__ import annotations

import logging

from guardrt.runtime.server.tokens import logged_caller

log = logging.getLogger("guardrt.refused")

# Reasons (the metrics' labels) that come in floods when the server is overloaded or stopping.
_FLOODS = frozenset(
    {
        "queue_full", "server_overloaded", "draining", "shutting_down", "engine_broken",
        "engine_unavailable", "loading", "rate_limited", "rate_limit_exceeded",
    }
)  # fmt: skip


def log_refusal(
    route: str,
    code: str,
    reason: str,
    message: str,
    request_id: str | None = None,
    caller: str | None = None,
) -> None:
    """Log one refused or failed call (`code`: the HTTP status or the gRPC status name;
    `caller`: its bearer token's name, once it passed authentication)."""
    level = logging.DEBUG if reason in _FLOODS else logging.INFO
    caller = logged_caller(caller)
    fields = {"request_id": request_id, "route": route, "status": code, "reason": reason}
    log.log(
        level,
        "refused %s on %s%s: %s %s: %s",
        request_id or "-",
        route,
        f" from {caller}" if caller else "",
        code,
        reason,
        message[:500],
        extra=fields | {"caller": caller},
    )
