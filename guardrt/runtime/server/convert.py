"""protobuf ↔ the runtime's dataclasses; nothing else (the servicer stays thin)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from guardrt.runtime.errors import ConfigError, ImageUrlError, ImageUrlReason
from guardrt.runtime.policy import DEFAULT_CATEGORIES
from guardrt.runtime.server.image_urls import Origin, RemoteImage, remote_image
from guardrt.runtime.server.service import ModerationInput, ModerationResult, Timing
from guardrt.runtime.verdict import Label, Verdict
from guardrt.v1 import moderation_pb2 as pb

_ROLES = {pb.USER: "user", pb.ASSISTANT: "assistant"}
_LABELS = {Label.SAFE: pb.SAFE, Label.UNSAFE: pb.UNSAFE, Label.ERROR: pb.ERROR}


def messages_from_proto(messages: Any, origins: Sequence[Origin] = ()) -> list[dict[str, Any]]:
    """Messages in the Python API's format. An unset role or content part is passed on as
    such, so validation refuses it by index like any other malformed message. An `image_url`
    from one of `origins` becomes a RemoteImage (fetched before preparation); any other is
    refused here, before anything is fetched (ImageUrlError, located)."""
    converted = []
    for index, message in enumerate(messages):
        parts: list[dict[str, Any]] = []
        for part, content in enumerate(message.content):
            kind = content.WhichOneof("part")
            if kind == "text":
                parts.append({"type": "text", "text": content.text})
            elif kind == "image":
                parts.append({"type": "image", "image": content.image})
            elif kind == "image_url":
                try:
                    remote = image_by_url(content.image_url, origins, index, part)
                except ImageUrlError as exc:
                    raise exc.located(message=index, part=part) from None
                parts.append({"type": "image", "image": remote})
            else:
                parts.append({"type": None})
        role = _ROLES.get(message.role) or (
            "unspecified" if message.role == pb.ROLE_UNSPECIFIED else f"enum value {message.role}"
        )  # a value newer than this server's proto arrives as its number
        converted.append({"role": role, "content": parts})
    return converted


def image_by_url(url: str, origins: Sequence[Origin], message: int, part: int) -> RemoteImage:
    """`Content.image_url` as a RemoteImage to fetch; ImageUrlError when the server fetches
    no URLs or not this one."""
    where = f"message {message} part {part}"
    if not origins:
        raise ImageUrlError(
            ImageUrlReason.REMOTE,
            f"{where}: this server fetches no image URLs (it was started without "
            "--image-url-origins); send the image's bytes in `image`",
            where,
        )
    if url.startswith("data:"):
        raise ImageUrlError(
            ImageUrlReason.INVALID,
            f"{where}: image_url takes an http: or https: URL; send an image's bytes in `image`, "
            "not as a data: URL",
            where,
        )
    instead = "send the image's bytes in `image`"
    return remote_image(url, origins, where, schemes="http: or https:", instead=instead)


def policy_from_proto(
    policy: Any,
) -> tuple[list[tuple[str, str]] | None, list[str], float | None]:
    """(categories, exclusions, threshold): None for no categories of its own, no threshold."""
    categories = [(c.code, c.description) for c in policy.categories] or None
    threshold = policy.unsafe_threshold if policy.HasField("unsafe_threshold") else None
    return categories, list(policy.exclude), threshold


def bulk_from_proto(priority: int) -> bool:
    """Whether a request's priority is BULK (`Priority`); a value newer than this server's
    proto (it arrives as its number) is a ConfigError naming it."""
    if priority in (pb.PRIORITY_UNSPECIFIED, pb.INTERACTIVE, pb.BULK):
        return priority == pb.BULK
    raise ConfigError(f"priority enum value {priority} is not INTERACTIVE or BULK")


def input_from_proto(
    request: pb.ModerateRequest, origins: Sequence[Origin] = ()
) -> ModerationInput:
    """The request as the service takes it (`origins`: where image URLs may be fetched)."""
    categories, excluded, threshold = policy_from_proto(request.policy)
    return ModerationInput(
        request.request_id,
        messages_from_proto(request.messages, origins),
        categories,
        excluded,
        bulk=bulk_from_proto(request.priority),
        unsafe_threshold=threshold,
    )


def verdict_to_proto(verdict: Verdict) -> pb.Verdict:
    probability, label_probability = verdict.unsafe_probability, verdict.label_probability
    return pb.Verdict(
        label=_LABELS[verdict.label],
        categories=verdict.categories,
        unsafe_probability=0.0 if math.isnan(probability) else probability,
        category_probabilities=verdict.category_probabilities,
        raw_output=verdict.raw_output,
        error=verdict.error or "",
        label_probability=0.0 if math.isnan(label_probability) else label_probability,
    )


def error_verdict(message: str, code: int) -> pb.Verdict:
    return pb.Verdict(label=pb.ERROR, error=message, error_code=code)


def timing_to_proto(timing: Timing) -> pb.Timing:
    return pb.Timing(
        queue_ms=timing.queue_ms,
        preprocess_ms=timing.preprocess_ms,
        model_ms=timing.model_ms,
        total_ms=timing.total_ms,
        batch_size=timing.batch_size,
        prefill_ms=timing.prefill_ms,
        decode_ms=timing.decode_ms,
        cached=timing.cached,
    )


def result_to_proto(result: ModerationResult) -> pb.ModerateResponse:
    return pb.ModerateResponse(
        request_id=result.request_id,
        verdict=verdict_to_proto(result.verdict),
        timing=timing_to_proto(result.timing),
        prompt_tokens=result.prompt_tokens,
        unsafe_threshold=result.unsafe_threshold or 0.0,
    )


def default_categories(
    listed: Sequence[tuple[str, str]] = DEFAULT_CATEGORIES,
) -> list[pb.Category]:
    """The categories of requests without their own (the model's, or the server's policy)."""
    return [pb.Category(code=code, description=text) for code, text in listed]
