"""A histogram small enough for the hot path: fixed buckets, no locks.

``observe`` is a bisect and two additions: cheap enough to run once per
delivered message (``Timeline``) or per Redis round trip (the publisher)
without the benchmark seeing it. The pod runs on one event loop, so nothing
here needs a lock. It exports nothing by itself: an exporter (the service's
Prometheus collector) reads ``buckets``, ``counts`` and ``sum`` when it is
scraped. ``realtime`` imports no metrics library.

``delivery_lag`` reads a message frame's server timestamp (``"ts"``, in
milliseconds) straight from its JSON bytes, as the one place that knows
where it is.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from types import TracebackType
from typing import Final

__all__ = [
    "LAG_BUCKETS",
    "ROUNDTRIP_BUCKETS",
    "Histogram",
    "message_ts",
]

LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds from a message's server timestamp to its delivery on a pod."""
ROUNDTRIP_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
"""Seconds of a Redis round trip (one pipelined batch)."""


class Histogram:
    """Counts of observed values per bucket (``value <= bound``), and their sum.

    ``counts`` has one more slot than ``buckets``: values above the last
    bound (Prometheus's ``+Inf``). Not cumulative; ``cumulative()`` is.
    """

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError("buckets must be increasing and not empty")
        self.buckets = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values <= it)`` per bucket, ``inf`` last."""
        total = 0
        out = []
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def time(self) -> _Timer:
        """``with h.time():`` or ``async with h.time():`` observes the seconds
        the block took, if it ends without an exception."""
        return _Timer(self)

    def observe_lag(self, payload: bytes) -> None:
        """Observe the seconds since the server timestamp of a message frame
        (``ts``, ms; a clock behind another pod's counts as 0). Frames
        without one are ignored."""
        ts = message_ts(payload)
        if ts is not None:
            lag = time.time() - ts / 1000
            self.observe(lag if lag > 0 else 0.0)


class _Timer:
    __slots__ = ("_histogram", "_start")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self._histogram.observe(time.perf_counter() - self._start)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(kind, exc, tb)


_TS: Final = b'"ts":'


def message_ts(payload: bytes) -> int | None:
    """The ``ts`` of a ``message`` frame's JSON, without decoding it.

    A message frame's fields before ``ts`` are the server's (type, offset,
    epoch, room, id, from), whose strings JSON escapes, so the first
    ``"ts":`` is its own and never the client's ``data``. None for any other
    frame."""
    if not payload.startswith(b'{"type":"message"'):
        return None
    at = payload.find(_TS)
    if at < 0:
        return None
    start = at + len(_TS)
    end = payload.find(b",", start)
    try:
        return int(payload[start:end])
    except ValueError:
        return None
