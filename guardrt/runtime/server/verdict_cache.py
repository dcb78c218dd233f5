"""`--verdict-cache N`: the verdicts of the last N distinct inputs, answered again without the
engine.

Moderation traffic repeats itself: a spam text sent thousands of times, a re-posted image, a
client's retry of a call whose answer it lost. The model is fixed for the process and decodes
deterministically (constrained or greedy), so the verdict of an input the model has already
judged is known: the cache answers it from memory. Off by default (a benchmark that replays one
request would measure the cache, not the model).

The key is what the model reads, hashed: the prompt's token ids (the conversation and the
policy's categories are in them), the codes the verdict grammar allows, and the image's uint8
canvas with its tile arrangement (the exact pixels; an image encoded differently but resized
to the same canvas is the same input). BLAKE2b, 16 bytes: no text or pixels are kept, only
their digest and the verdict. Only `safe` and `unsafe` verdicts are kept; errors are not, and
an engine failure never reaches it. A hit's scores are those of the first computation (a batch
of other shapes can move a probability in its last digits; the label is the model's for that
input either way).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from guardrt.runtime.requests import Decoded, PreparedRequest
from guardrt.runtime.verdict import Label


def request_key(request: PreparedRequest) -> bytes:
    """The digest of everything the model's verdict on `request` depends on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(request.prompt, dtype=np.int64).tobytes())
    digest.update(",".join(request.grammar.codes).encode())
    image = request.image
    if image is None:
        digest.update(b"|no image")
    else:
        high, wide = image.tiles
        digest.update(f"|image {high}x{wide} {image.aspect_ratio_id} {image.dtype}|".encode())
        digest.update(np.ascontiguousarray(image.canvas).data)
    return digest.digest()


@dataclass(frozen=True)
class _Entry:
    """What a verdict is rebuilt from (`Decoded` without its request: no pixels held)."""

    generated: tuple[int, ...]
    unsafe_probability: float
    category_probabilities: dict[str, float]
    label_probability: float


class VerdictCache:
    """An LRU map of request digests to verdicts (used on the event loop only: no lock)."""

    def __init__(self, entries: int) -> None:
        if entries < 1:
            raise ValueError(f"a verdict cache holds at least 1 entry, not {entries}")
        self.entries = entries
        self._map: OrderedDict[bytes, _Entry] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._map)

    def get(self, key: bytes, request: PreparedRequest) -> Decoded | None:
        """The cached answer to `request` (whose digest is `key`), or None (a miss)."""
        entry = self._map.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._map.move_to_end(key)
        self.hits += 1
        return Decoded(
            request,
            entry.generated,
            entry.unsafe_probability,
            dict(entry.category_probabilities),
            label_probability=entry.label_probability,
        )

    def put(self, key: bytes, decoded: Decoded) -> None:
        """Keep a `safe` or `unsafe` verdict (an error verdict is answered, never kept)."""
        if decoded.verdict().label is Label.ERROR:
            return
        self._map[key] = _Entry(
            decoded.generated,
            decoded.unsafe_probability,
            dict(decoded.category_probabilities),
            decoded.label_probability,
        )
        self._map.move_to_end(key)
        while len(self._map) > self.entries:
            self._map.popitem(last=False)
