"""`--verdict-cache N`: the verdicts of the last N distinct inputs, answered again without
preparing them or running the engine.

Moderation traffic repeats itself: a spam text sent thousands of times, a re-posted image, a
client's retry of a call whose answer it lost. The model is fixed for the process, preparation
(template, tokenizer, image tiling) is a pure function of the request, and decoding is
deterministic (constrained or greedy), so the verdict of an input already judged is known: the
cache answers it from memory, before the image is decoded. Off by default (a benchmark that
replays one request would measure the cache, not the model).

The key is the request as the service received it, hashed: every message's role and parts (an
image's bytes, once fetched when given by URL), the policy the request is judged against (after
the server's, `server_policy.py`) and the roles left unread. It is canonical JSON with each
type tagged (a tuple is not a list, 1 is not 1.0 or true), so two requests with one key are the
same request; a request holding anything else (a PIL image through the Python API) is not
cached. BLAKE2b, 16 bytes: no text or pixels are kept, only their digest and the verdict. Only
`safe` and `unsafe` verdicts are kept: an error verdict, an invalid request and an engine
failure are met again next time. A hit's scores are those of the first computation (a batch of
other shapes can move a probability in its last digits; the label is the model's for that
input either way).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardrt.runtime.scores import TokenLogprob
from guardrt.runtime.verdict import Label, Verdict

# Hashing this many bytes of image takes a fraction of a millisecond: more goes to a thread.
INLINE_KEY_BYTES = 64 * 1024


class _UnkeyableError(Exception):
    """A value the key cannot stand for exactly (the request is then not cached)."""


# Scalars by type, each tagged (bool before int: True is an int).
_SCALARS: tuple[tuple[type, str, Any], ...] = (
    (bool, "bool", bool),
    (int, "int", str),
    (float, "float", repr),
)


def _tagged(value: object) -> Any:
    """`value` as JSON in which every type is explicit; bytes as their digest."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return {"bytes": hashlib.blake2b(data, digest_size=32).hexdigest(), "length": len(data)}
    if value is None or isinstance(value, str):
        return value
    for kind, tag, shown in _SCALARS:
        if isinstance(value, kind):
            return {tag: shown(value)}
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return {"map": {key: _tagged(item) for key, item in value.items()}}
    if isinstance(value, list | tuple):
        return {type(value).__name__: [_tagged(item) for item in value]}
    raise _UnkeyableError


def input_key(
    messages: Sequence[Mapping[str, Any]],
    categories: Sequence[tuple[str, str]] | None,
    excluded: Sequence[str],
    ignored_roles: Sequence[str],
    top_logprobs: int | None = None,
    unsafe_threshold: float | None = None,
) -> bytes | None:
    """The digest of a request as the service prepares it (its decision threshold too), with
    what its answer holds (token logprobs); None when it holds a value the key cannot stand
    for exactly."""
    try:
        document = _tagged(
            {
                "messages": list(messages),
                "categories": None if categories is None else list(categories),
                "excluded": list(excluded),
                "ignored_roles": list(ignored_roles),
                "top_logprobs": top_logprobs,
                "unsafe_threshold": unsafe_threshold,
            }
        )
    except _UnkeyableError:
        return None
    text = json.dumps(document, sort_keys=True, ensure_ascii=True, allow_nan=False)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def image_bytes(messages: Sequence[Mapping[str, Any]]) -> int:
    """Bytes of image payload in `messages` (what hashing the key reads)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                payload = part.get("image") if isinstance(part, Mapping) else None
                if isinstance(payload, bytes | bytearray | memoryview):
                    total += len(payload)
    return total


@dataclass(frozen=True)
class CachedVerdict:
    """What an answer is rebuilt from."""

    verdict: Verdict
    prompt_tokens: int
    generated_tokens: int
    image_tiles: int
    token_logprobs: tuple[TokenLogprob, ...] | None = None
    unsafe_threshold: float | None = None  # the key holds it: the same as the repeat's


class VerdictCache:
    """An LRU map of request digests to verdicts (used on the event loop only: no lock)."""

    def __init__(self, entries: int) -> None:
        if entries < 1:
            raise ValueError(f"a verdict cache holds at least 1 entry, not {entries}")
        self.entries = entries
        self._map: OrderedDict[bytes, CachedVerdict] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._map)

    def get(self, key: bytes) -> CachedVerdict | None:
        """The verdict kept for `key`, or None (a miss)."""
        entry = self._map.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._map.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, entry: CachedVerdict) -> None:
        """Keep a `safe` or `unsafe` verdict (an error verdict is answered, never kept)."""
        if entry.verdict.label is Label.ERROR:
            return
        self._map[key] = entry
        self._map.move_to_end(key)
        while len(self._map) > self.entries:
            self._map.popitem(last=False)
