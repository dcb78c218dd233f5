"""Each answered request's log line: its figures as fields (sizes, counts, scores, timings,
who sent it, its trace), never its text or pixels (refused calls' lines: `refusals.py`)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from guardrt.runtime.server.tokens import logged_caller

if TYPE_CHECKING:  # the service logs through this module
    from guardrt.runtime.server.service import ModerationInput, ModerationResult

log = logging.getLogger("guardrt.service")


def log_request(item: ModerationInput, result: ModerationResult, chars: int) -> None:
    """One request's log line, its figures as fields (`chars`: its text's length; never the
    text or its pixels)."""
    verdict, timing = result.verdict, result.timing
    fields = {
        "request_id": result.request_id,
        "messages": len(item.messages),
        "text_chars": chars,
        "image_tiles": result.image_tiles,
        "prompt_tokens": result.prompt_tokens,
        "bulk": item.bulk,
        "caller": logged_caller(item.caller),
        "trace_id": item.trace_id or None,
        "label": verdict.label.value,
        "categories": list(verdict.categories),
        # Scores, for an audit of a disputed verdict (never the text it was about).
        "unsafe_probability": _rounded(verdict.unsafe_probability),
        "label_probability": _rounded(verdict.label_probability),
        "unsafe_threshold": result.unsafe_threshold,  # what decided the label (None: argmax)
        "batch_size": timing.batch_size,
        "cached": timing.cached,
        "queue_ms": round(timing.queue_ms, 2),
        "model_ms": round(timing.model_ms, 2),
        "total_ms": round(timing.total_ms, 2),
    }
    caller = fields["caller"]
    log.info(
        "request %s%s: %d messages, %d text chars, image %s, %d prompt tokens, %s, %s, %.1f ms",
        result.request_id,
        f" from {caller}" if caller else "",
        fields["messages"],
        fields["text_chars"],
        f"{result.image_tiles} tiles" if result.image_tiles else "none",
        result.prompt_tokens,
        verdict.label.value,
        "cached" if timing.cached else f"batch {timing.batch_size}",
        timing.total_ms,
        extra=fields,
    )


def _rounded(probability: float) -> float | None:
    """A probability for a log field: 6 significant digits, None for NaN (no score)."""
    return None if math.isnan(probability) else float(f"{probability:.6g}")
