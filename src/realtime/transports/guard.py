"""The terms a connection is held to, and the pod-wide keepalive.

A connection is admitted on terms (see ``access``): which rooms it may join
and when its credential expires. Its ``Guard`` keeps them, along with its
rate limiter and the timer that closes it at expiry. The ``Warden`` makes
each guard and enforces it: it refuses a room the connection may not join
(or one room too many), closes an expired connection, answers a frame over
the rate limit with an error, and closes a flood.

``Keepalive`` is one timer for the whole pod, not one per connection
(aiohttp's own heartbeat would keep a timer per connection, about 0.6 KB):
it pings the clients that have gone quiet and closes those that do not
answer.

Nothing here knows aiohttp: connections are answered through the hub and
closed through ``Connection.close``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..core.access import Admission, RoomCheck
from ..core.connection import Connection, ConnectionState
from ..core.exceptions import ProtocolError
from ..core.hub import LocalHub
from ..core.protocol import PING_FRAME, CloseCode, ErrorCode, decode_client_frame, encode_error
from ..core.ratelimit import RateLimiter, Verdict

__all__ = ["Guard", "GuardCounters", "Keepalive", "Warden"]


@dataclass(slots=True)
class Guard:
    """Per-connection terms: room authorization, rate limit, expiry timer."""

    may_join: RoomCheck | None = None
    limiter: RateLimiter | None = None
    expiry: asyncio.TimerHandle | None = None

    def allows(self, room: str) -> bool:
        return self.may_join is None or self.may_join(room)

    def disarm(self) -> None:
        """The connection is gone: stop its expiry timer."""
        if self.expiry is not None:
            self.expiry.cancel()


@dataclass(slots=True)
class GuardCounters:
    rate_limited: int = 0
    """Frames refused by the rate limit, each answered with an error frame."""
    closed_rate_abuse: int = 0
    closed_expired: int = 0


class Warden:
    """Makes each connection's ``Guard`` and enforces it."""

    def __init__(
        self,
        hub: LocalHub,
        *,
        max_rooms: int,
        rate_per_second: float,
        rate_burst: int,
        rate_max_refused: int,
    ) -> None:
        self._hub = hub
        self._max_rooms = max_rooms
        self._rate = rate_per_second
        self._burst = rate_burst
        self._max_refused = rate_max_refused
        self.counters = GuardCounters()

    def guard(self, conn: Connection, granted: Admission) -> Guard:
        """The guard of a connection admitted on ``granted``; its expiry
        timer, if any, is running."""
        guard = Guard(may_join=granted.may_join)
        if granted.expires_at is not None:
            delay = max(0.0, granted.expires_at - time.time())
            guard.expiry = asyncio.get_running_loop().call_later(delay, self._expire, conn)
        return guard

    def _expire(self, conn: Connection) -> None:
        if conn.state is ConnectionState.OPEN:
            self.counters.closed_expired += 1
            conn.close(CloseCode.POLICY_VIOLATION, "token expired")

    def check_join(self, conn: Connection, guard: Guard, room: str, ref: str | int | None) -> None:
        """Raise ``ProtocolError`` unless the connection may join ``room``."""
        if not guard.allows(room):
            raise ProtocolError(ErrorCode.FORBIDDEN_ROOM, f"not allowed in room {room!r}", ref=ref)
        if len(conn.rooms) >= self._max_rooms:
            raise ProtocolError(
                ErrorCode.TOO_MANY_ROOMS,
                f"a connection may be in at most {self._max_rooms} rooms",
                ref=ref,
            )

    def within_rate(self, conn: Connection, guard: Guard, raw: str | bytes) -> bool:
        """Apply the rate limit: answer a frame over it with ``rate_limited``
        (dropping it), close a flood with 1008."""
        now = time.monotonic()
        limiter = guard.limiter
        if limiter is None:
            # Made at the first frame rather than at accept: a bucket starts
            # full either way, so the limit is the same, and an idle
            # connection does not carry one (about 160 bytes).
            limiter = RateLimiter(self._rate, self._burst, self._max_refused, now=now)
            guard.limiter = limiter
        verdict = limiter.check(now)
        if verdict is Verdict.ALLOW:
            return True
        if verdict is Verdict.ABUSE:
            self.counters.closed_rate_abuse += 1
            conn.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
            return False
        try:
            ref = decode_client_frame(raw).ref
        except ProtocolError as exc:
            ref = exc.ref
        self.counters.rate_limited += 1
        message = f"over {limiter.rate:g} frames per second; this frame was dropped"
        self._hub.send_to(conn, encode_error(ErrorCode.RATE_LIMITED, message, ref))
        return False


class Keepalive:
    """One tick for the whole pod, every half ``interval`` while it has
    connections; the reader loop resets ``Connection.quiet_ticks`` at each
    frame a client sends."""

    def __init__(self, hub: LocalHub, interval: float) -> None:
        self._hub = hub
        self._interval = interval
        """Seconds; 0 turns keepalive off."""
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Make sure the tick is scheduled (a connection was just added)."""
        if self._timer is None and self._interval > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._interval / 2, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        """Ping each client that has sent nothing for two ticks (half to one
        whole interval), and close each that has not answered by the next
        tick (half an interval after the ping)."""
        self._timer = None
        for conn in self._hub.connections():
            conn.quiet_ticks += 1
            if conn.quiet_ticks == 2:
                conn.send_frame(PING_FRAME)
            elif conn.quiet_ticks > 2:
                conn.close(CloseCode.GOING_AWAY, "no answer to ping")
        if self._hub.connection_count:
            self.arm()
