"""OpenAI's request and response shapes ↔ the moderation service's (no HTTP framework here).

`/v1/chat/completions` answers what the hosted Llama Guard 3 Vision answers (`safe` or
`unsafe\\nS1,S3`); `/v1/moderations` answers OpenAI's moderation schema with real scores:
score_k = P(unsafe) × P(S_k | unsafe). Every refusal is an `ApiError` rendered in OpenAI's
error shape.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from guardrt.runtime.errors import (
    GuardrtError,
    ImageUrlError,
    ImageUrlReason,
    Location,
    PromptError,
)
from guardrt.runtime.policy import DEFAULT_CATEGORIES, check_threshold
from guardrt.runtime.server.api_errors import ApiError, bad, json_kind
from guardrt.runtime.server.chat_logprobs import asked_logprobs
from guardrt.runtime.server.image_urls import Origin, RemoteImage, remote_image
from guardrt.runtime.server.service import ModerationInput

ALIASES = ("meta-llama/Llama-Guard-3-11B-Vision", "meta-llama/Llama-Guard-3-11B-Vision-Turbo")
# Chat messages accepted and ignored: Llama Guard's template has no system role, and the hosted
# API's own sample sends one.
IGNORED_ROLES = ("developer", "system")
# OpenAI-style snake_case names of the hazard categories (moderations' keys).
CATEGORY_NAMES = {
    "S1": "violent_crimes",
    "S2": "non_violent_crimes",
    "S3": "sex_crimes",
    "S4": "child_exploitation",
    "S5": "defamation",
    "S6": "specialized_advice",
    "S7": "privacy",
    "S8": "intellectual_property",
    "S9": "indiscriminate_weapons",
    "S10": "hate",
    "S11": "self_harm",
    "S12": "sexual_content",
    "S13": "elections",
}
assert list(CATEGORY_NAMES) == [code for code, _ in DEFAULT_CATEGORIES]
# Sampling parameters the hosted API takes: accepted and range-checked, never used (the
# verdict is always the constrained/greedy one).
_SAMPLING = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "max_tokens": (1, 1_000_000),
    "max_completion_tokens": (1, 1_000_000),
    "top_k": (0, 1_000_000),
    "repetition_penalty": (0.0, 10.0),
    "seed": (-(2**63), 2**63 - 1),
}


def check_model(model: object, served: str) -> str:
    if not isinstance(model, str):  # absent or not a name: the request is malformed (400)
        raise bad(f"model must be a string naming the model, got {json_kind(model)}", "model")
    if model not in (served, *ALIASES):
        shown = repr(model)[:80]
        raise ApiError(
            404,
            f"The model {shown} does not exist; this server serves {served!r} "
            f"(aliases: {', '.join(ALIASES)})",
            param="model",
            code="model_not_found",
        )
    return model


# Large base64 payloads are decoded in pieces of this many characters (a multiple of 4): the
# decoder holds the GIL for the whole of one call (~2 ms a MB), and between pieces the event
# loop, whose answers wait on it, gets its turn.
B64_PIECE_CHARS = 1 << 18


def b64decode_strict(payload: str, piece: int = B64_PIECE_CHARS) -> bytes:
    """`base64.b64decode(payload, validate=True)`, in pieces of `piece` characters: the same
    bytes, and the same refusals (binascii.Error)."""
    assert piece > 0, piece
    assert piece % 4 == 0, piece
    # Whole 4-character groups before any padding decode on their own, 3 bytes each; the rest
    # (the last whole group, what follows it and the padding: the decoder's rules for the end,
    # excess padding after a whole group among them) goes to one final call.
    padding = payload.find("=")
    body = max(0, (len(payload) if padding == -1 else padding) // 4 * 4 - 4)
    if body <= piece:
        return base64.b64decode(payload, validate=True)
    pieces = [
        base64.b64decode(payload[start : min(start + piece, body)], validate=True)
        for start in range(0, body, piece)
    ]
    pieces.append(base64.b64decode(payload[body:], validate=True))
    return b"".join(pieces)


def decode_image_url(
    part: Mapping[str, Any], where: str, origins: Sequence[Origin] = ()
) -> bytes | RemoteImage:
    """The bytes of a `data:` URL, or a URL from one of `origins` to fetch (`image_urls.py`);
    other URLs are refused (no outbound connections but to those origins)."""
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str):
        raise bad(f"{where}: image_url needs a 'url'", param=where)
    if not url.startswith("data:") and origins:
        try:
            return remote_image(url, origins, where)
        except ImageUrlError as exc:
            raise bad(str(exc), param=where, code=exc.code) from exc
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16]
        raise bad(
            f"{where}: only data: URLs are accepted (got a {scheme!r} URL); this server makes "
            "no outbound connections (unless started with --image-url-origins): send the "
            "image inline as data:image/...;base64,...",
            param=where,
            code=ImageUrlReason.REMOTE.value,
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise bad(f"{where}: the data: URL must be base64-encoded", param=where)
    try:
        return b64decode_strict(payload)
    except (binascii.Error, ValueError) as exc:
        raise bad(f"{where}: the data: URL is not valid base64", param=where) from exc


def _content_parts(
    content: object, where: str, origins: Sequence[Origin] = ()
) -> list[dict[str, Any]]:
    """OpenAI content (a string or text/image_url parts) → guardrt's parts (an image fetched
    from one of `origins` is a RemoteImage until it is)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of parts", param=where)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        here = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part, Mapping):
            parts.append({"type": "text", "text": part.get("text")})
        elif kind == "image_url" and isinstance(part, Mapping):
            parts.append({"type": "image", "image": decode_image_url(part, here, origins)})
        else:
            shown = repr(kind)[:30]
            raise bad(f"{here}: type {shown} is not 'text' or 'image_url'", param=here)
    return parts


_EXTENSION_KEYS = ("categories", "exclude", "unsafe_threshold")
_CATEGORY_KEYS = ("code", "description")


def _refuse_unknown(fields: Mapping[Any, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted((key for key in fields if key not in known), key=str)
    if unknown:
        shown = repr(unknown[0])[:40]
        raise bad(
            f"{where} has unknown key {shown}; known: {', '.join(known)}",
            param=f"{where}.{unknown[0]}"[:80],
            code="unknown_key",
        )


def policy_extension(body: Mapping[str, Any]) -> tuple[Any, Any, float | None]:
    """The `guardrt` extension field: {"categories": [{"code", "description"}], "exclude": [],
    "unsafe_threshold": t}, as (categories, exclusions, threshold)."""
    extension = body.get("guardrt") or {}
    if not isinstance(extension, Mapping):
        raise bad("guardrt must be an object", param="guardrt")
    # A misspelt key ("excluded") must not leave the policy silently unchanged.
    _refuse_unknown(extension, _EXTENSION_KEYS, "guardrt")
    raw = extension.get("categories")
    categories = None
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(c, Mapping) for c in raw):
            raise bad(
                "guardrt.categories must be a list of {code, description}",
                param="guardrt.categories",
            )
        for index, category in enumerate(raw):
            _refuse_unknown(category, _CATEGORY_KEYS, f"guardrt.categories[{index}]")
        categories = [(c.get("code"), c.get("description")) for c in raw]
    exclude = extension.get("exclude", [])
    if not isinstance(exclude, list):
        raise bad("guardrt.exclude must be a list of codes", param="guardrt.exclude")
    try:
        threshold = check_threshold(extension.get("unsafe_threshold"), "guardrt.unsafe_threshold")
    except PromptError as exc:
        raise bad(str(exc), param="guardrt.unsafe_threshold") from exc
    return categories, exclude, threshold  # the codes are checked by make_policy


# Request headers that bound how long the caller waits, in seconds: our own, and the one the
# `openai` client sends on every call (its read timeout, 600 s by default). Past the smaller,
# queued work is dropped unrun and answered 504: the caller has stopped reading, and its
# client's retry would otherwise queue behind the abandoned copy.
TIMEOUT_HEADERS = ("X-Request-Timeout", "X-Stainless-Read-Timeout")
_MAX_TIMEOUT_S = 86_400.0


def request_deadline(headers: Mapping[str, str], now: float) -> float | None:
    """The `time.monotonic()` deadline the timeout headers give (None without them)."""
    timeouts = []
    for name in TIMEOUT_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds <= _MAX_TIMEOUT_S:  # NaN and inf fail here too
            raise bad(
                f"header {name} must be a number of seconds in (0, {_MAX_TIMEOUT_S:g}], "
                f"not {raw[:40]!r}",
                param=name,
                code="invalid_timeout",
            )
        timeouts.append(seconds)
    return now + min(timeouts) if timeouts else None


class BodyPlaces(Protocol):
    """A parsed request body that places the runtime's errors in itself."""

    def param(self, at: Location) -> str | None: ...

    def message(self, error: GuardrtError) -> str: ...


@dataclass
class ChatRequest:
    model: str
    item: ModerationInput
    stream: bool
    listed: tuple[bool, ...] = ()  # per message: its content was a list of parts (not a string)
    include_usage: bool = False  # stream_options.include_usage (a streamed answer's usage chunk)

    def param(self, at: Location) -> str | None:
        """The body's place of an input error (`param`): the runtime numbers messages and
        parts as the body does."""
        if at.message is None:
            return None
        where = f"messages[{at.message}]"
        if at.part is None:
            return where
        listed = at.message < len(self.listed) and self.listed[at.message]
        return f"{where}.content[{at.part}]" if listed else f"{where}.content"

    def message(self, error: GuardrtError) -> str:
        return str(error)  # it names the message and part as the body numbers them


def _check_sampling(body: Mapping[str, Any]) -> None:
    for name, (low, high) in _SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (low <= value <= high)
        ):
            raise bad(f"{name} must be a number in [{low}, {high}], not {value!r}"[:200], name)
    if body.get("n", 1) != 1:
        raise bad("n must be 1: the model gives one verdict per conversation", param="n")
    # `stop` is accepted and never applied, as `max_tokens`: the verdict grammar ends the
    # answer, and no stop sequence may cut its category line off.
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) for x in stop))
    ):
        raise bad(
            f"stop must be a string or a list of up to 4 strings, not {json_kind(stop)}",
            param="stop",
        )


# OpenAI's `service_tier`: "flex" (for work that can wait) runs as a bulk request, after the
# interactive ones and within its share of the queue; the others as interactive (the default).
SERVICE_TIERS = {"auto": False, "default": False, "priority": False, "scale": False, "flex": True}


def bulk_tier(body: Mapping[str, Any]) -> bool:
    """Whether the body's `service_tier` asks for bulk ("flex"); other values are refused."""
    tier = body.get("service_tier")
    if tier is None:
        return False
    if not isinstance(tier, str) or tier not in SERVICE_TIERS:
        shown = repr(tier)[:30] if isinstance(tier, str) else json_kind(tier)
        raise bad(
            f"service_tier must be one of {', '.join(SERVICE_TIERS)}, not {shown}",
            param="service_tier",
            code="invalid_service_tier",
        )
    return SERVICE_TIERS[tier]


# What the answer is, for refusals of fields asking for another shape of it.
_ANSWER = (
    "the answer is the model's verdict text ('safe', or 'unsafe' and a line of categories); "
    "P(unsafe) and each category's probability are in the response's `guardrt` field"
)


def _check_answer_shape(body: Mapping[str, Any]) -> None:
    """Fields that ask for an answer this model cannot give are refused, not ignored: a client
    asking for JSON would otherwise get plain text and fail later."""
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, Mapping):
        raise bad(
            'response_format must be an object such as {"type": "text"}, got '
            f"{json_kind(response_format)}",
            param="response_format",
        )
    kind = (response_format or {}).get("type", "text")
    if kind != "text":
        shown = repr(kind)[:40] if isinstance(kind, str) else json_kind(kind)
        raise bad(
            f"response_format type {shown} is not supported, only 'text': {_ANSWER}",
            param="response_format",
            code="unsupported_response_format",
        )
    # A bias would move the verdict by fiat; the trade-off it is after has its own knob.
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, Mapping):
        raise bad(f"logit_bias must be an object, not {json_kind(bias)}", param="logit_bias")
    if bias:
        raise bad(
            "logit_bias is not applied to a verdict: to trade false alarms for misses, set "
            '"guardrt": {"unsafe_threshold": t} (unsafe when P(unsafe) >= t)',
            param="logit_bias",
            code="unsupported_logit_bias",
        )
    # Tools may be offered (the answer is then text, as a model that chose none writes), but
    # a call cannot be demanded: the model answers a verdict and calls no tool.
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad(f"tools must be an array, not {json_kind(tools)}", param="tools")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        shown = repr(choice)[:40] if isinstance(choice, str) else json_kind(choice)
        raise bad(
            f"tool_choice {shown} cannot be met, only 'none' or 'auto': the model calls no "
            f"tool; {_ANSWER}",
            param="tool_choice",
            code="unsupported_tool_choice",
        )


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    """`stream_options.include_usage`: whether a streamed answer ends with OpenAI's usage
    chunk (no choices), the other chunks saying `usage: null`."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, Mapping):
        raise bad(
            f"stream_options must be an object, not {json_kind(options)}", param="stream_options"
        )
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise bad(
            f"stream_options.include_usage must be true or false, not {json_kind(include)}",
            param="stream_options.include_usage",
        )
    return bool(include)


def parse_chat(
    body: object, served: str, request_id: str, origins: Sequence[Origin] = ()
) -> ChatRequest:
    if not isinstance(body, Mapping):
        raise bad("the request body must be a JSON object")
    model = check_model(body.get("model"), served)
    _check_sampling(body)
    _check_answer_shape(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", param="messages")
    converted, listed = [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise bad(f"{where} must be an object", param=where)
        role = message.get("role")
        if role in IGNORED_ROLES:  # kept in place (unread) so that errors number as the body
            converted.append({"role": role})
            listed.append(False)
            continue
        content = _content_parts(message.get("content"), where, origins)
        converted.append({"role": role, "content": content})
        listed.append(isinstance(message.get("content"), list))
    categories, exclude, threshold = policy_extension(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", param="stream")
    item = ModerationInput(
        request_id,
        converted,
        categories,
        exclude,
        ignored_roles=IGNORED_ROLES,
        bulk=bulk_tier(body),
        top_logprobs=asked_logprobs(body),
        unsafe_threshold=threshold,
    )
    return ChatRequest(model, item, stream, tuple(listed), _include_usage(body, stream))


@dataclass
class ModerationInputs:
    model: str
    items: list[ModerationInput]
    types: list[list[str]] = field(default_factory=list)  # input types of each item
    custom: bool = False  # custom categories: results are keyed by code, not by name
    parts: bool = False  # `input` was one list of parts (each item's message 0 is all of it)

    def param(self, at: Location) -> str | None:
        """The body's place of an input error (`param`): `input`, `input[k]` (the k-th of
        several strings), or `input[j]` (the j-th part of a multimodal input)."""
        if self.parts:
            return "input" if at.part is None else f"input[{at.part}]"
        if len(self.items) == 1:
            return "input"
        return None if at.item is None else f"input[{at.item}]"

    def message(self, error: GuardrtError) -> str:
        """The runtime's message, said where in the body: each input is judged as message 0
        of a conversation of its own, which the body does not show."""
        where = self.param(error.at)
        return f"{where}: {error}" if where else str(error)


def parse_moderations(
    body: object, served: str, request_id: str, origins: Sequence[Origin] = ()
) -> ModerationInputs:
    """`input`: a string, a list of strings (one result each), or a list of text/image_url
    parts (one result for the whole multimodal input; its image fetched from one of `origins`
    is a RemoteImage until it is)."""
    if not isinstance(body, Mapping):
        raise bad("the request body must be a JSON object")
    model = check_model(body.get("model", served), served)
    categories, exclude, threshold = policy_extension(body)
    bulk = bulk_tier(body)  # not in OpenAI's moderations API: sent with `extra_body`
    raw = body.get("input")
    parts = False
    if isinstance(raw, str):
        groups: list[object] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        groups = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, Mapping) for x in raw):
        groups, parts = [raw], True
    else:
        raise bad("input must be a string, a list of strings, or a list of parts", "input")
    items, types = [], []
    for index, group in enumerate(groups):
        where = f"input[{index}]" if len(groups) > 1 else "input"
        content = _content_parts(group, where, origins)
        kinds = sorted({"image" if p["type"] == "image" else "text" for p in content})
        items.append(
            ModerationInput(
                f"{request_id}-{index}",
                [{"role": "user", "content": content}],
                categories,
                exclude,
                bulk=bulk,
                unsafe_threshold=threshold,
            )
        )
        types.append(kinds)
    return ModerationInputs(model, items, types, categories is not None, parts)
