"""A progress display for long export steps: one line per step, updated in place on a TTY."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total, self.stream = total_steps, stream or sys.stderr
        self.index, self.started, self.name = 0, 0.0, ""
        self.live = self.stream.isatty()

    def step(self, name: str) -> None:
        """Start the next named step."""
        self.index, self.name, self.started = self.index + 1, name, time.perf_counter()
        self._write(f"[{self.index}/{self.total}] {name} …", final=not self.live)

    def update(self, done: int, total: int, what: str) -> None:
        """Within a step: `done` of `total` `what` (shown in place on a terminal)."""
        if self.live:
            self._write(f"[{self.index}/{self.total}] {self.name} … {what} {done}/{total}")

    def done(self, summary: str = "") -> float:
        elapsed = time.perf_counter() - self.started
        tail = f": {summary}" if summary else ""
        self._write(f"[{self.index}/{self.total}] {self.name} done in {elapsed:.1f} s{tail}", True)
        return elapsed

    def note(self, text: str) -> None:
        """A line of its own, outside the steps (a warning the user should act on)."""
        self._write(text, final=True)

    def _write(self, text: str, final: bool = False) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
