"""W3C Trace Context: the trace id a caller's `traceparent` carries, for the request's log line.

A service that traces its calls (OpenTelemetry) sends `traceparent: 00-<trace id>-<parent
id>-<flags>` (an HTTP header, or gRPC metadata). The request's log line then carries the
trace id, so its verdict, timings and batch can be found from the caller's trace. A value that
is not a valid traceparent is ignored, as the specification asks: tracing never fails a call.
"""

from __future__ import annotations

import re

# version-traceid-parentid-flags (https://www.w3.org/TR/trace-context/#traceparent-header);
# later versions may append fields after a dash.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def trace_id(traceparent: str | None) -> str:
    """The trace id of a `traceparent` value, or "" when there is none or it is not valid
    (version ff, an all-zero id, extra fields after version 00, not lowercase hex)."""
    if not traceparent:
        return ""
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return ""
    version, trace, parent, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace) == {"0"} or set(parent) == {"0"}:
        return ""
    return trace
