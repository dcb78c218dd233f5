"""The service's results in OpenAI's response shapes: chat completions (whole or as SSE chunks)
and moderation results, each with the `guardrt` extension field (scores, label, raw output)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from guardrt.runtime.server.openai_compat import CATEGORY_NAMES
from guardrt.runtime.server.service import ModerationResult
from guardrt.runtime.verdict import Label


def tier_name(bulk: bool) -> str:
    """The `service_tier` an answer reports."""
    return "flex" if bulk else "default"


def verdict_extension(result: ModerationResult) -> dict[str, Any]:
    verdict = result.verdict
    probability, label = verdict.unsafe_probability, verdict.label_probability
    return {
        "label": verdict.label.value,
        "categories": verdict.categories,
        "unsafe_probability": None if math.isnan(probability) else probability,
        "category_probabilities": verdict.category_probabilities,
        "label_probability": None if math.isnan(label) else label,
        "error": verdict.error,
        # The model's own text (an error's `content` is `unsafe`, whatever the model wrote).
        "raw_output": verdict.raw_output,
        "request_id": result.request_id,
        "cached": result.timing.cached,  # from --verdict-cache: judged before, not now
        "unsafe_threshold": result.unsafe_threshold,  # what decided the label; None: the likelier
    }


def chat_completion(
    result: ModerationResult,
    model: str,
    created: int,
    bulk: bool = False,
    logprobs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The answer; `logprobs`: the choice's (`chat_logprobs.choice_logprobs`) when asked."""
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generated_tokens,
        "total_tokens": result.prompt_tokens + result.generated_tokens,
    }
    message = {"role": "assistant", "content": result.verdict.content}
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": "stop", "logprobs": logprobs}
        ],
        "usage": usage,
        "service_tier": tier_name(bulk),
        "guardrt": verdict_extension(result),
    }


def chat_chunks(
    result: ModerationResult,
    model: str,
    created: int,
    bulk: bool = False,
    logprobs: Mapping[str, Any] | None = None,
    include_usage: bool = False,
) -> list[dict[str, Any]]:
    """The `stream: true` answer: role, content (with its tokens' `logprobs` when asked), then
    the finish (with usage and scores). With `include_usage` (`stream_options`), OpenAI's
    shape: every chunk says `usage: null` and a last one without choices carries it."""
    base: dict[str, Any] = {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": tier_name(bulk),
    }
    if include_usage:
        base["usage"] = None

    def chunk(
        delta: dict[str, Any],
        finish: str | None,
        scores: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": scores}
        return base | {"choices": [choice]} | extra

    final = chat_completion(result, model, created, bulk)
    chunks = [
        chunk({"role": "assistant", "content": ""}, None),
        chunk({"content": result.verdict.content}, None, logprobs),
    ]
    if not include_usage:
        return [*chunks, chunk({}, "stop", usage=final["usage"], guardrt=final["guardrt"])]
    finish = chunk({}, "stop", guardrt=final["guardrt"])
    return [*chunks, finish, base | {"choices": [], "usage": final["usage"]}]


def moderation_result(
    result: ModerationResult, types: Sequence[str], custom: bool = False
) -> dict[str, Any]:
    """One result; keys are the snake_case names of S1-S13, or the codes of custom categories."""
    verdict = result.verdict
    probability = 0.0 if math.isnan(verdict.unsafe_probability) else verdict.unsafe_probability
    names = {
        code: code if custom else CATEGORY_NAMES.get(code, code)
        for code in verdict.category_probabilities
    }
    flagged = verdict.label is not Label.SAFE  # an error is flagged: fail closed
    return {
        "flagged": flagged,
        "categories": {names[c]: c in verdict.categories for c in names},
        "category_scores": {
            names[c]: probability * p for c, p in verdict.category_probabilities.items()
        },
        "category_applied_input_types": {names[c]: list(types) for c in names},
        "guardrt": verdict_extension(result),
    }


def moderations_response(
    request_id: str, model: str, results: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"id": f"modr-{request_id}", "model": model, "results": results}


def now() -> int:
    return int(time.time())
