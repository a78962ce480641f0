"""A per-connection rate limit: a token bucket, plus a tally of refusals.

Pure: the caller passes the time in, nothing here sleeps or reads a clock.
Each client frame costs one token; tokens refill at ``rate`` per second up to
``burst``. A frame that finds the bucket empty is *refused* (the handler
answers it with a ``rate_limited`` error frame and drops it). Refusals pile up
in a second tally that drains at the same ``rate``: a client that is only a
little over the limit never fills it, a flood does, and once it holds more
than ``max_refused`` the verdict is ``ABUSE`` (the handler closes with 1008).
"""

from __future__ import annotations

import enum

__all__ = ["RateLimiter", "Verdict"]


class Verdict(enum.Enum):
    ALLOW = "allow"
    LIMITED = "limited"
    ABUSE = "abuse"


class RateLimiter:
    """Token bucket of ``burst`` tokens refilled at ``rate`` per second."""

    __slots__ = ("_last", "_refused", "_tokens", "burst", "max_refused", "rate")

    def __init__(self, rate: float, burst: int, max_refused: int, *, now: float) -> None:
        if rate <= 0 or burst < 1 or max_refused < 0:
            raise ValueError("rate must be > 0, burst >= 1 and max_refused >= 0")
        self.rate = rate
        self.burst = burst
        self.max_refused = max_refused
        self._tokens = float(burst)
        self._refused = 0.0
        self._last = now

    def check(self, now: float) -> Verdict:
        """Take one token at time ``now`` (seconds, monotonic)."""
        elapsed = max(0.0, now - self._last)
        self._last = now
        drained = elapsed * self.rate
        self._tokens = min(float(self.burst), self._tokens + drained)
        self._refused = max(0.0, self._refused - drained)
        if self._tokens > 1.0 - 1e-9:  # (refills add up with rounding errors)
            self._tokens = max(0.0, self._tokens - 1.0)
            return Verdict.ALLOW
        self._refused += 1.0
        return Verdict.ABUSE if self._refused > self.max_refused else Verdict.LIMITED
