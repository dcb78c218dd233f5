"""Images by URL on the HTTP API, fetched from the origins an operator allows, and no others.

OpenAI's `image_url` takes `https://` URLs as well as `data:` ones, and code written for the
hosted Llama Guard 3 Vision sends them (an upload's object-store URL). This server makes no
outbound connection by default; `--image-url-origins` names where it may fetch from, as origins
(`https://images.example.com`, `http://minio.internal:9000`, `https://*.cdn.example.com` for
every subdomain). What is fetched is bounded: the image decoder's byte limit (read as it
arrives, and refused before it when the length is announced), `--image-url-timeout-s` for the
whole fetch, a number of fetches at a time (the rest wait within the same timeout), no
redirects (a redirect could leave the allowed origins), no proxy or credentials from the
environment. A URL that cannot be fetched is an error for its request, never a verdict on the
conversation without its image (fail closed).

Messages and logs name a URL's origin only, never its path or query (a signed URL's query is a
credential).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

import aiohttp
import yarl

from guardrt.runtime.conversation import parse_messages
from guardrt.runtime.errors import ConfigError, ImageUrlError, ImageUrlReason

if TYPE_CHECKING:  # the server's config imports this module; the service imports the config
    from guardrt.runtime.server.service import ModerationInput

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class Origin:
    """Where images may be fetched from: a scheme, a host (`*.` + a domain: its subdomains),
    a port."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        default = _DEFAULT_PORTS[self.scheme] == self.port
        return f"{self.scheme}://{_bracketed(self.host)}" + ("" if default else f":{self.port}")

    def allows(self, scheme: str, host: str, port: int) -> bool:
        if (scheme, port) != (self.scheme, self.port):
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def _split(url: str) -> tuple[SplitResult, int]:
    """urlsplit and the port (the scheme's default when absent); ValueError when the URL is
    malformed (a port out of range among others)."""
    parts = urlsplit(url)
    port = parts.port  # ValueError for a port that is not a number in range
    scheme = parts.scheme.lower()
    return parts, port if port is not None else _DEFAULT_PORTS.get(scheme, 0)


def parse_origin(entry: str) -> Origin:
    """One `--image-url-origins` entry; a ConfigError naming it when it is not
    scheme://host[:port] with scheme http or https and nothing else."""
    problem = None
    try:
        parts, port = _split(entry.strip())
    except ValueError as exc:
        raise ConfigError(f"image URL origin {entry!r} is malformed: {exc}") from exc
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS:
        problem = "its scheme must be http or https"
    elif not host or host == "*." or "*" in host.removeprefix("*."):
        problem = "it needs a host (`*.` may start it, for every subdomain)"
    elif parts.username is not None or parts.password is not None:
        problem = "it must not hold credentials"
    elif parts.path not in ("", "/") or parts.query or parts.fragment:
        problem = "an origin has no path, query or fragment"
    if problem is not None:
        raise ConfigError(
            f"image URL origin {entry!r}: {problem} (e.g. https://images.example.com)"
        )
    return Origin(scheme, host, port)


def parse_origins(entries: Sequence[str]) -> tuple[Origin, ...]:
    return tuple(parse_origin(entry) for entry in entries if entry.strip())


@dataclass(frozen=True)
class RemoteImage:
    """An image part's URL, checked against the origins, to be fetched (`where`: its place in
    the request body)."""

    url: str
    origin: str  # scheme://host[:port]: what messages may name
    where: str


# How a refused URL's image can be sent instead, on the HTTP API.
INLINE_DATA_URL = "send the image inline as data:image/...;base64,..."


def remote_image(
    url: str,
    origins: Sequence[Origin],
    where: str,
    *,
    schemes: str = "data:, http: or https:",
    instead: str = INLINE_DATA_URL,
) -> RemoteImage:
    """`url` as a RemoteImage when one of `origins` allows it; ImageUrlError otherwise
    (`schemes`: the URLs the API takes, `instead`: how else to send the image, for messages)."""
    try:
        parts, port = _split(url)
    except ValueError as exc:
        raise ImageUrlError(
            ImageUrlReason.INVALID, f"{where}: the image URL is malformed", where
        ) from exc
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        shown = repr(scheme[:16])
        raise ImageUrlError(
            ImageUrlReason.INVALID,
            f"{where}: an image URL must be {schemes} with a host (got a {shown} URL)",
            where,
        )
    if parts.username is not None or parts.password is not None:
        raise ImageUrlError(
            ImageUrlReason.INVALID, f"{where}: an image URL must not hold credentials", where
        )
    origin = str(Origin(scheme, host, port))
    if not any(allowed.allows(scheme, host, port) for allowed in origins):
        raise ImageUrlError(
            ImageUrlReason.NOT_ALLOWED,
            f"{where}: images are not fetched from {origin} (not among the server's "
            f"--image-url-origins); {instead}",
            where,
        )
    return RemoteImage(url, origin, where)


def _bracketed(host: str) -> str:
    """An IPv6 literal as a URL writes it."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int  # the image decoder's limit: more could never be decoded
    timeout_s: float = 10.0  # the whole fetch, waiting for a turn included
    concurrent: int = 16  # fetches at a time (each holds up to max_bytes)


class ImageFetcher:
    """Fetches RemoteImages (one aiohttp session, made on first use on the serving loop)."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._turns: asyncio.Semaphore | None = None

    def _client(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        if self._session is None or self._turns is None:
            # trust_env=False: no proxy or .netrc credentials picked up from the environment.
            # auto_decompress=False with `Accept-Encoding: identity`: the byte limit bounds
            # what is held (a small compressed body can inflate a thousandfold).
            self._session = aiohttp.ClientSession(
                trust_env=False,
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
            )
            self._turns = asyncio.Semaphore(self.limits.concurrent)
        return self._session, self._turns

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, image: RemoteImage) -> bytes:
        """The bytes at `image.url`; ImageUrlError when they cannot be had within the limits."""
        session, turns = self._client()
        seconds = self.limits.timeout_s
        try:
            async with asyncio.timeout(seconds), turns:
                return await self._get(session, image)
        except TimeoutError as exc:
            raise ImageUrlError(
                ImageUrlReason.UNAVAILABLE,
                f"{image.where}: {image.origin} did not send the image within {seconds:g} s",
                image.where,
            ) from exc
        except ValueError as exc:  # a URL urlsplit took and the HTTP client does not
            raise ImageUrlError(
                ImageUrlReason.INVALID, f"{image.where}: the image URL is malformed", image.where
            ) from exc
        except aiohttp.ClientError as exc:
            raise ImageUrlError(
                ImageUrlReason.UNAVAILABLE,
                f"{image.where}: the image could not be fetched from {image.origin} "
                f"({type(exc).__name__})",
                image.where,
            ) from exc

    async def _get(self, session: aiohttp.ClientSession, image: RemoteImage) -> bytes:
        limit = self.limits.max_bytes
        # encoded=True: the URL goes out byte for byte (re-quoting it would break a signed
        # URL's signature, which covers its exact path and query).
        url = yarl.URL(image.url, encoded=True)
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                client_fault = response.status < 500
                raise ImageUrlError(
                    ImageUrlReason.FETCH_FAILED if client_fault else ImageUrlReason.UNAVAILABLE,
                    f"{image.where}: {image.origin} answered {response.status}"
                    + (" (redirects are not followed)" if 300 <= response.status < 400 else ""),
                    image.where,
                )
            encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise ImageUrlError(
                    ImageUrlReason.FETCH_FAILED,
                    f"{image.where}: {image.origin} sent the image {encoding[:20]!r}-encoded; "
                    "it is fetched unencoded (Accept-Encoding: identity)",
                    image.where,
                )
            announced = response.content_length
            if announced is not None and announced > limit:
                raise _too_large(image, limit)
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                body += chunk
                if len(body) > limit:
                    raise _too_large(image, limit)
        return bytes(body)

    @staticmethod
    def wanted(item: ModerationInput) -> bool:
        """Whether `item` holds an image to fetch."""
        return any(isinstance(part.get("image"), RemoteImage) for part in _parts(item))

    async def resolve(self, item: ModerationInput) -> ModerationInput:
        """`item` with its image fetched when it is a RemoteImage. The conversation is checked
        first (a second image is refused before anything is fetched)."""
        if not self.wanted(item):
            return item  # nothing to fetch: the conversation is checked where it always is
        conversation = parse_messages(item.messages, ignored_roles=item.ignored_roles)
        image = conversation.image
        if image is None or not isinstance(image.source, RemoteImage):
            return item
        data = await self.fetch(image.source)
        messages = list(item.messages)
        message = messages[image.message_index]
        content = list(message["content"])
        content[image.part_index] = {**content[image.part_index], "image": data}
        messages[image.message_index] = {**message, "content": content}
        return dataclasses.replace(item, messages=messages)


def _parts(item: ModerationInput) -> list[Mapping[str, Any]]:
    """The content parts of `item`'s messages that are objects."""
    return [
        part
        for message in item.messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping)
    ]


def _too_large(image: RemoteImage, limit: int) -> ImageUrlError:
    return ImageUrlError(
        ImageUrlReason.TOO_LARGE,
        f"{image.where}: the image at {image.origin} is over the {limit}-byte limit",
        image.where,
    )
