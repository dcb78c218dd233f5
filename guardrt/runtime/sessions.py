"""Cache slots kept across requests: the K/V of a conversation reused by its next request.

A streaming check of a growing answer opens a session; each of its requests names it, and the
engine re-reads only the tokens that differ from the session's previous prompt (the longest
common prefix is already in the slot's cache, image K/V included). Opening and closing happen
on server threads; slots are used on the engine thread. A request whose session was closed
meanwhile simply runs without one.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class SessionState:
    slot: int  # the cache row the session owns
    cached: tuple[int, ...] = ()  # the prompt whose K/V the slot holds (engine thread only)
    image_ready: bool = False  # the slot's image K/V are written (or cleared, without image)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


class SessionTable:
    def __init__(self, first_slot: int, count: int) -> None:
        self.first_slot, self.count = first_slot, count
        self._free = list(range(first_slot + count - 1, first_slot - 1, -1))
        self._open: dict[int, SessionState] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def open(self) -> int | None:
        """A new session id, or None when every session slot is taken."""
        with self._lock:
            if not self._free:
                return None
            session = next(self._ids)
            self._open[session] = SessionState(self._free.pop())
            return session

    def close(self, session: int) -> None:
        with self._lock:
            state = self._open.pop(session, None)
            if state is not None:
                self._free.append(state.slot)

    def available(self) -> int:
        """Session slots free now."""
        with self._lock:
            return len(self._free)

    def get(self, session: int | None) -> SessionState | None:
        if session is None:
            return None
        with self._lock:
            return self._open.get(session)
