"""Requests per second per caller (`--max-rate-per-caller`): a token bucket, pure arithmetic.

A caller's bucket holds up to `burst` tokens and gains `rate` a second; a request takes one.
A call that finds none is refused at once and told when one will be there (gRPC's
`grpc-retry-pushback-ms`, HTTP's `Retry-After`). A stream's request (ModerateMany, a
/v1/moderations list, a ModerateStream check) reserves the next token instead and waits for
it, so a backlog is paced at the caller's rate rather than refused: reservations may take the
bucket below zero, each waiting (−tokens / rate) for its turn, in order; a call finding the
bucket in debt is refused, as the caller is past its rate.

Time is passed in (monotonic seconds), so the arithmetic is tested without a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """One caller's bucket (mutable; the service holds one per caller, on the event loop)."""

    rate: float  # tokens gained per second (> 0)
    burst: float  # the most it holds (≥ 1): requests a quiet caller may send at once
    tokens: float  # now; below 0 while reservations wait
    stamp: float  # when `tokens` was last brought up to date

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)  # a clock that steps back gains nothing
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float) -> float:
        """Take a token now: 0.0 when taken, else the seconds until one will be there (none
        taken; what a refusal tells the caller to wait)."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def reserve(self, now: float) -> float:
        """Take the next token, there or not: the seconds to wait for it (0.0 when there)."""
        self._refill(now)
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def give_back(self) -> None:
        """Return a reserved token whose request will not run (cancelled, past its deadline)."""
        self.tokens = min(self.burst, self.tokens + 1)


def burst_for(rate: float, burst: int) -> float:
    """The bucket size: `burst` when given, else one second of `rate` (at least 1)."""
    return float(burst) if burst > 0 else float(max(1, math.ceil(rate)))
