"""Typed errors raised at guardrt's boundaries.

Servers map each class to a status (gRPC code / HTTP status) in one place. Messages name the
offending value (a size, a mode, a key) and never contain prompt text or image bytes.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Self


@dataclasses.dataclass(frozen=True)
class Location:
    """Where in the caller's input an error lies (what is known of it): which input of a call
    that has several, which message, which part of it. The HTTP API turns it into `param`."""

    item: int | None = None
    message: int | None = None
    part: int | None = None


class GuardrtError(Exception):
    """Base class of every error guardrt raises on purpose."""

    at = Location()

    def located(self, **where: int) -> Self:
        """This error with `where` (Location's fields) added to its location; returns it."""
        self.at = dataclasses.replace(self.at, **where)
        return self


class ImageReason(enum.Enum):
    """Why an image was refused; stable strings, used as metric labels."""

    EMPTY = "empty"
    TOO_MANY_BYTES = "too_many_bytes"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNKNOWN_FORMAT = "unknown_format"
    CORRUPT = "corrupt"
    MULTI_FRAME = "multi_frame"
    UNSUPPORTED_MODE = "unsupported_mode"
    BAD_INPUT = "bad_input"
    NOT_FOUND = "not_found"


class ImageError(GuardrtError):
    """An image that guardrt will not judge. `reason` says why, the message says what."""

    def __init__(self, reason: ImageReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConfigError(GuardrtError):
    """A configuration file or value guardrt cannot honour; the message names the key."""


class PromptReason(enum.Enum):
    """Why a conversation or policy was refused; stable strings, used as metric labels."""

    EMPTY = "empty"  # no messages
    ROLE = "role"  # a role other than user/assistant, or roles not alternating from user
    CONTENT = "content"  # content neither a string nor a list of text/image parts
    TEXT = "text"  # text that is not a string of valid Unicode
    IMAGES = "images"  # more than one image in the conversation
    CATEGORY = "category"  # a malformed custom category (code or description)
    EXCLUDED = "excluded"  # an excluded code the policy does not have, or nothing left
    TOO_LONG = "too_long"  # the prompt and its verdict do not fit the model's sequence limit
    THRESHOLD = "threshold"  # an unsafe threshold outside (0, 1], or one greedy decoding ignores


class PromptError(GuardrtError):
    """A conversation or policy the template cannot render as the model was trained to read.

    The message names the message index, part index, key or category code; never user text.
    """

    def __init__(self, reason: PromptReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ServiceReason(enum.Enum):
    """Why the service did not run a request; stable strings, used as metric labels."""

    QUEUE_FULL = "queue_full"  # the bounded queue is full: refused at once
    DEADLINE = "deadline"  # the deadline passed before the request ran; it was not run
    DRAINING = "draining"  # shutting down: no new work
    ENGINE = "engine"  # the engine failed on the batch holding this request
    TOO_LARGE = "too_large"  # a request beyond the configured text or size limits
    UNAUTHENTICATED = "unauthenticated"  # missing or wrong bearer token
    BROKEN = "engine_broken"  # the engine failed its self-check: this server takes no work
    RATE_LIMITED = "rate_limited"  # the caller is past --max-rate-per-caller: refused at once


class ServiceError(GuardrtError):
    """A request the service refused or could not run; the message names the limit hit."""

    def __init__(
        self, reason: ServiceReason, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        # When a retry could be taken (the servers say it: gRPC's retry pushback, Retry-After).
        self.retry_after_s = retry_after_s


class ImageUrlReason(enum.Enum):
    """Why an image given by URL was not used; stable strings (the HTTP API's error codes)."""

    REMOTE = "remote_image_url"  # the server fetches no URLs (no --image-url-origins)
    INVALID = "invalid_image_url"  # not an http(s) URL with a host, or malformed
    NOT_ALLOWED = "image_url_not_allowed"  # from an origin the server does not fetch from
    FETCH_FAILED = "image_url_fetch_failed"  # the origin refused it: a 4xx, a redirect, encoded
    TOO_LARGE = "image_url_too_large"  # over the image decoder's byte limit
    UNAVAILABLE = "image_url_unavailable"  # a 5xx, a timeout, no connection: may work later


class ImageUrlError(GuardrtError):
    """An image URL not fetched (`image_urls.py`). `where` is its place in the request; the
    message names the URL's origin only, never its path or query (a signed URL's query is a
    credential)."""

    def __init__(self, reason: ImageUrlReason, message: str, where: str = "") -> None:
        super().__init__(message)
        self.reason, self.where = reason, where

    @property
    def code(self) -> str:
        """The HTTP API's error code."""
        return self.reason.value

    @property
    def status(self) -> int:
        """The HTTP status: 502 when the image's server failed, 400 for the URL or its refusal."""
        return 502 if self.reason is ImageUrlReason.UNAVAILABLE else 400
