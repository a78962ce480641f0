"""Users: reaching every connection of one user, on every pod.

A message to a user or an order to disconnect them travels to every pod,
this one included, as a *control* envelope on the backend's channel for
everyone (``Backend.publish(None, ...)``); each pod acts on its own
connections of that user. Nothing is stored: a user with no open
connection gets nothing, and a pod that misses the envelope (its link to
Redis down at that moment) does not act on it: best effort, like messages
to everyone.

A client cannot forge a control envelope: everything a client sends is
re-encoded by the server as a ``{"type":"message",…}`` frame, and a control
envelope starts with ``{"type":"control",``.

A disconnect may also *ban* the user for some seconds: each pod refuses the
user's new connections (HTTP 403) until then. Bans live in each pod's
memory: a pod started after the ban does not know it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .backends import Backend
from .core.connection import Connection, ConnectionState
from .core.hub import LocalHub
from .core.protocol import Message

__all__ = ["CONTROL_PREFIX", "MAX_BAN_SECONDS", "USER_CLOSE_CODES", "Users", "UsersCounters"]

log = logging.getLogger("realtime.users")

CONTROL_PREFIX: Final = b'{"type":"control",'
USER_CLOSE_CODES: Final = range(4000, 5000)
"""Close codes a disconnect may give: the private range of RFC 6455."""
MAX_BAN_SECONDS: Final = 86_400.0
MAX_BANS: Final = 100_000
"""Bans a pod remembers at once; past it the ones closest to their end go first."""


@dataclass(slots=True)
class UsersCounters:
    messages: int = 0
    """User messages this pod delivered (once per message, not per connection)."""
    deliveries: int = 0
    """Connections that got a user message."""
    closed: int = 0
    """Connections closed by a disconnect order."""
    refused_banned: int = 0
    """Upgrades refused because the user is banned."""


class Users:
    """Sends and acts on control envelopes; holds this pod's bans."""

    def __init__(
        self, hub: LocalHub, backend: Backend, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._hub = hub
        self._backend = backend
        self._clock = clock
        self._bans: dict[str, float] = {}
        """User id → when (``clock``) the ban ends."""
        self.counters = UsersCounters()

    # -- out ----------------------------------------------------------------------

    def send(self, user: str, message: Message) -> None:
        """``message`` (its ``room`` is ignored) to every connection of
        ``user`` on every pod."""
        self._publish(
            {
                "op": "message",
                "user": user,
                "message": {
                    "id": message.id,
                    "from": message.sender.as_json(),
                    "ts": message.ts,
                    "data": message.data,
                },
            }
        )

    def disconnect(self, user: str, code: int, reason: str, ban: float = 0.0) -> None:
        """Close every connection of ``user`` on every pod with ``code`` (in
        ``USER_CLOSE_CODES``) and ``reason``; with ``ban`` > 0, refuse their
        new connections for that many seconds."""
        if code not in USER_CLOSE_CODES:
            raise ValueError(f"close code {code} is not in 4000-4999")
        if not 0 <= ban <= MAX_BAN_SECONDS:
            raise ValueError(f"a ban lasts 0 to {MAX_BAN_SECONDS:g} seconds")
        self._publish(
            {"op": "disconnect", "user": user, "code": code, "reason": reason, "ban": ban}
        )

    def _publish(self, fields: dict[str, Any]) -> None:
        self._backend.publish(None, orjson.dumps({"type": "control", **fields}))

    # -- in -----------------------------------------------------------------------

    def banned_for(self, user: str) -> float:
        """Seconds left of ``user``'s ban on this pod (0: not banned)."""
        if not self._bans:
            return 0.0
        until = self._bans.get(user)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._bans[user]
            return 0.0
        return left

    def on_control(self, payload: bytes) -> None:
        """A control envelope from any pod (this one included)."""
        try:
            envelope = orjson.loads(payload)
            op, user = envelope["op"], envelope["user"]
            if op == "message":
                self._deliver(user, envelope["message"])
            elif op == "disconnect":
                self._disconnect(user, int(envelope["code"]), str(envelope["reason"]), envelope)
            else:
                raise ValueError(f"unknown op {op!r}")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # from a pod of another version, or a bug: never a client's doing
            log.warning("ignored a control envelope (%s): %.200r", exc, payload)

    def _connections(self, user: str) -> list[Connection]:
        return [
            conn
            for conn in self._hub.connections()
            if conn.identity.id == user and conn.state is ConnectionState.OPEN
        ]

    def _deliver(self, user: str, message: dict[str, Any]) -> None:
        conns = self._connections(user)
        if not conns:
            return
        frame = orjson.dumps({"type": "message", "room": None, "to": user, **message})
        self.counters.messages += 1
        for conn in conns:
            if self._hub.send_to(conn, frame):
                self.counters.deliveries += 1

    def _disconnect(self, user: str, code: int, reason: str, envelope: dict[str, Any]) -> None:
        ban = float(envelope.get("ban") or 0.0)
        if ban > 0:
            if len(self._bans) >= MAX_BANS and user not in self._bans:
                self._forget_bans()
            self._bans[user] = self._clock() + min(ban, MAX_BAN_SECONDS)
        for conn in self._connections(user):
            conn.close(code, reason)
            self.counters.closed += 1

    def _forget_bans(self) -> None:
        now = self._clock()
        self._bans = {user: until for user, until in self._bans.items() if until > now}
        while len(self._bans) >= MAX_BANS:
            del self._bans[min(self._bans, key=self._bans.__getitem__)]

    def stats(self) -> dict[str, int]:
        counters = self.counters
        return {
            "messages": counters.messages,
            "deliveries": counters.deliveries,
            "closed": counters.closed,
            "refused_banned": counters.refused_banned,
            "bans": len(self._bans),
        }
