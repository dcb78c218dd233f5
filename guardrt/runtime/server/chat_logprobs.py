"""Token logprobs in OpenAI's chat shape: `logprobs` / `top_logprobs` of a request, and the
choice's `logprobs.content` of its answer.

Code written for the hosted model reads P(unsafe) off the first token's logprob, or the top
alternatives at it. Each entry is the model's own full-vocabulary log-probability of the token
at its position (`scores.TokenLogprob`), whatever constrained decoding allowed there; the
entries' bytes make the answer's `content` (`safe`, or `unsafe` `\\n` `S` `1` `,S` `3`).
An error verdict answers `unsafe` though the model wrote something else: it has no entries
(`content: null`), since no token of the model stands behind that text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from guardrt.runtime.scores import MAX_TOP_LOGPROBS, TokenLogprob
from guardrt.runtime.server.api_errors import bad, json_kind

# OpenAI's value for a token the model gives no probability to (a log-probability that is not
# finite cannot be written in JSON).
NO_PROBABILITY = -9999.0


def asked_logprobs(body: Mapping[str, Any]) -> int | None:
    """The alternatives a chat body asks for at each verdict token (0: the tokens' own
    logprobs only), or None when it asks for no logprobs; a 400 naming a bad value."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad(f"logprobs must be true or false, not {json_kind(wanted)}", param="logprobs")
    top = body.get("top_logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS
    ):
        number = isinstance(top, int | float) and not isinstance(top, bool)
        shown = repr(top)[:20] if number else json_kind(top)
        raise bad(
            f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, not {shown}",
            param="top_logprobs",
        )
    if top and not wanted:
        raise bad(f"top_logprobs ({top}) needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def _entry(token: int, logprob: float, token_bytes: Callable[[int], bytes]) -> dict[str, Any]:
    raw = token_bytes(token)
    return {
        "token": raw.decode("utf-8", errors="replace"),
        "logprob": logprob if math.isfinite(logprob) else NO_PROBABILITY,
        "bytes": list(raw),
    }


def choice_logprobs(
    entries: Sequence[TokenLogprob] | None, token_bytes: Callable[[int], bytes]
) -> dict[str, Any]:
    """A choice's `logprobs` for a request that asked: one entry per content token, with its
    alternatives; `content` null for an error verdict (no entries)."""
    if entries is None:
        return {"content": None, "refusal": None}
    content = [
        _entry(e.token, e.logprob, token_bytes)
        | {"top_logprobs": [_entry(t, value, token_bytes) for t, value in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}
