"""Node: the wiring root of one pod.

A ``Node`` builds the parts of a pod from ``NodeSettings`` and owns them:
the ``LocalHub`` (connections and rooms), the backend (chosen by URL, see
``realtime.backends``), the ``Timeline`` (room order and catch-up) and
``Presence``. It starts and stops them in one order, and it is the only way
in and out of them:

- **in from the backend**: it is the backend's ``BackendHandler``. Room
  entries (``on_entry``) go through the timeline to the room's members;
  unordered messages (``on_message``: global messages, presence events) go
  to the hub. Every pod, the sending one included, delivers by these paths.
- **out to the backend**: ``publish`` is the one way to send a message, for
  WebSocket sessions and the HTTP API alike.
- **membership**: ``join``, ``leave`` and ``disconnect`` change the hub, which
  says whether a room got its first local member or lost its last; the node
  then opens or closes the room's timeline and subscribes or unsubscribes the
  backend.
- **admission**: ``admit`` decides whether a WebSocket upgrade may proceed
  (draining, capacity, the ``Identify`` hook, the room). The optional
  ``Screen`` hook (``screen``) is what sessions ask before sending a
  client's message (``realtime.core.screen``).

Transports (``realtime.transports``) adapt a web server to it; ``Session``
(``realtime.session``) is what one connection may do.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .backends import Backend, LinkState, OnAppended, RedisOptions, Stamp, Unstored, open_backend
from .core.access import (
    Admission,
    Handshake,
    Identify,
    Reauthorize,
    admission,
    guest_identity,
    read_handshake,
)
from .core.connection import Connection, ConnectionState, Transport
from .core.exceptions import Refused, StateError
from .core.histogram import LAG_BUCKETS, Histogram
from .core.hub import LocalHub
from .core.protocol import Catchup, CloseCode, Message
from .core.screen import Screen
from .core.sequencer import Entry
from .rooms.presence import Presence
from .rooms.timeline import Timeline, TimelineSettings
from .users import CONTROL_PREFIX, Users

__all__ = ["Ids", "Limits", "Node", "NodeCounters", "NodeSettings", "NodeState", "close_label"]

log = logging.getLogger("realtime.node")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may do, and how many a pod takes."""

    max_message_bytes: int = 64 * 1024
    """Largest client frame; a larger one closes the connection with 1009."""
    max_buffered_bytes: int = 1024 * 1024
    """Bytes a client may fall behind before it is closed with 1013."""
    max_rooms: int = 10
    """Rooms one connection may be in at once."""
    max_connections: int = 0
    """Open connections on this pod before new ones get HTTP 503 (0: no cap)."""
    rate_per_second: float = 0.0
    """Client frames per second per connection (0: no limit); see ``ratelimit``."""
    rate_burst: int = 100
    """Frames a connection may send at once before ``rate_per_second`` applies."""
    rate_max_refused: int = 100
    """Refused frames (net of the rate) before a flood is closed with 1008."""


@dataclass(frozen=True, slots=True)
class NodeSettings:
    pod_id: str
    """This pod's name in stats, logs and the backend's envelopes."""
    name: str = "realtime"
    """The service's name (Redis client names)."""
    backend_url: str = ""
    """Empty: local-only; ``redis://``, ``rediss://``, ``unix://``: one Redis."""
    history_length: int = 100
    """Messages kept per room for history and resume."""
    history_ttl: float = 3600.0
    """Seconds a room's history and offsets are kept after its last message."""
    history_max_bytes: int = 1 << 20
    """Bytes of messages a room's history keeps (with ``history_length``)."""
    memory_bytes: int = 64 << 20
    """Bytes of recent messages the pod keeps in memory, all rooms together
    (local-only: the history as well)."""
    idempotency_keys: int = 1000
    """Message keys a room remembers (within ``history_ttl``)."""
    gap_wait: float = 0.25
    """Seconds a missing offset is waited for before it is read from history."""
    sync_timeout: float = 5.0
    """Seconds a join waits for the room's position before going live without."""
    presence_ttl: float = 15.0
    """Seconds after which a stopped pod's presence entries vanish."""
    limits: Limits = field(default_factory=Limits)
    redis: RedisOptions = field(default_factory=RedisOptions)


class NodeState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"
    """Refusing new connections; the ones open are being closed."""
    STOPPED = "stopped"


class Ids:
    """Short ids unique across pods: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(5).hex()
        self._next = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._next):x}"


@dataclass(slots=True)
class NodeCounters:
    connections_accepted: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    """Connections gone, by close code (``close_label``): the server's code
    when it closed first, else the client's; ``1006`` when neither sent one."""
    frames_received: int = 0
    """Text and binary frames received from clients."""
    messages_received: int = 0
    """Messages sent by this pod's clients (room and global)."""
    published: dict[str, int] = field(default_factory=dict)
    """Messages handed to ``publish``, by scope: ``room``, ``global``, ``api``."""
    errors_sent: int = 0
    """Error frames sent to clients (the rate limit's included)."""
    errors: dict[str, int] = field(default_factory=dict)
    """Error frames sent to clients, by error code."""
    rate_limited: int = 0
    """Frames refused by the rate limit, each answered with an error frame."""
    closed_rate_abuse: int = 0
    closed_expired: int = 0
    refreshed: int = 0
    """Connections that took a new token (``refresh`` frames accepted)."""
    refused: dict[int, int] = field(default_factory=dict)
    """Upgrades refused, by HTTP status."""
    started: float = field(default_factory=time.monotonic)


_STANDARD_CLOSE_CODES = frozenset(range(1000, 1016))


def close_label(code: int | None) -> str:
    """A close code as a metrics label, from a bounded set (a client may
    send any code from 1000 to 4999): the codes of RFC 6455 as they are,
    ``3xxx`` and ``4xxx`` for the registered and private ranges, ``1005``
    for a Close without a code, ``1006`` when no Close was exchanged."""
    if code is None:
        return "1006"
    if code in _STANDARD_CLOSE_CODES:
        return str(code)
    if code <= 0:
        return "1005"
    if 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


class Node:
    """Builds, starts and stops one pod's parts; the one way in and out of them."""

    def __init__(
        self,
        settings: NodeSettings,
        *,
        backend: Backend | None = None,
        identify: Identify = guest_identity,
        reauthorize: Reauthorize | None = None,
        screen: Screen | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.pod_id = settings.pod_id
        self.hub = LocalHub()
        self.backend = backend or open_backend(
            settings.backend_url,
            pod_id=settings.pod_id,
            name=settings.name,
            history_length=settings.history_length,
            history_ttl=settings.history_ttl,
            history_max_bytes=settings.history_max_bytes,
            memory_bytes=settings.memory_bytes,
            idempotency_keys=settings.idempotency_keys,
            redis=settings.redis,
        )
        self.delivery_lag = Histogram(LAG_BUCKETS)
        """Seconds from a message's server timestamp to its delivery on this
        pod, once per message (not per recipient)."""
        self.timeline = Timeline(
            self.hub,
            self.backend,
            TimelineSettings(
                keep=settings.history_length,
                gap_wait=settings.gap_wait,
                sync_timeout=settings.sync_timeout,
                max_bytes=settings.history_max_bytes,
                memory_bytes=settings.memory_bytes,
            ),
            clock=clock,
            lag=self.delivery_lag,
        )
        self.presence = Presence(
            self.hub,
            self.backend.presence(settings.presence_ttl),
            deliver=self.on_message,
            ttl=settings.presence_ttl,
        )
        self.users = Users(self.hub, self.backend, clock)
        """Every connection of one user, on every pod: messages, disconnects, bans."""
        self._identify = identify
        self.reauthorize = reauthorize
        """How a ``refresh`` frame's token is checked; None: refreshes are refused."""
        self.screen = screen
        """The publish hook sessions ask about their clients' messages (None: none)."""
        self.new_message_id = Ids()
        """A fresh message id, unique across pods."""
        self._connection_ids = Ids()
        self._upgrading = 0
        self.state = NodeState.NEW
        self.counters = NodeCounters()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the backend (serving locally even if it cannot connect yet)
        and presence."""
        if self.state is not NodeState.NEW:
            raise StateError(f"node {self.pod_id} was started already")
        self.state = NodeState.RUNNING
        await self.backend.start(self)
        self.presence.start()

    def drain(self) -> None:
        """Refuse new connections from now on (readiness turns false)."""
        if self.state is NodeState.RUNNING:
            self.state = NodeState.DRAINING

    @property
    def draining(self) -> bool:
        return self.state is not NodeState.RUNNING

    def close_connections(self, code: int = CloseCode.GOING_AWAY, reason: str = "") -> int:
        """Drain, and start closing every connection; returns how many."""
        self.drain()
        return self.hub.close_all(code, reason or "server shutting down")

    async def stop(self) -> None:
        """Stop presence, the timeline and the backend, in that order; idempotent."""
        if self.state is NodeState.STOPPED:
            return
        self.state = NodeState.STOPPED
        await self.presence.stop()
        await self.timeline.stop()
        await self.backend.stop()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Node]:
        """``async with node.running():`` start, and stop at the end."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    # -- admission ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admit(
        self,
        *,
        room: str | None,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        remote: str | None = None,
    ) -> AsyncIterator[tuple[Handshake, Admission]]:
        """Decide whether a WebSocket upgrade (for ``room``, None: the global
        channel) may proceed: raises ``Refused`` (shutting down, pod full,
        bad room or catch-up, or whatever ``identify`` refuses), else yields
        the ``Handshake`` and its ``Admission``. The connection counts
        against ``max_connections`` from here on; the transport accepts the
        WebSocket and calls ``connect`` inside the block. Refusals are
        counted by status."""
        try:
            if self.draining:
                raise Refused(503, "server is shutting down")
            cap = self.settings.limits.max_connections
            if cap and self.hub.connection_count + self._upgrading >= cap:
                raise Refused(503, "server is full; try again later", headers={"Retry-After": "1"})
            self._upgrading += 1
            try:
                handshake = read_handshake(self._connection_ids(), room, query, headers, remote)
                granted = admission(await self._identify(handshake))
                banned = self.users.banned_for(granted.identity.id)
                if banned:
                    self.users.counters.refused_banned += 1
                    raise Refused(
                        403,
                        f"this user may not connect for another {math.ceil(banned)} s",
                        headers={"Retry-After": str(math.ceil(banned))},
                    )
                if not granted.allows(handshake.room):
                    where = "the global channel" if room is None else f"room {room!r}"
                    raise Refused(403, f"not allowed in {where}")
                yield handshake, granted
            finally:
                self._upgrading -= 1
        except Refused as exc:
            refused = self.counters.refused
            refused[exc.status] = refused.get(exc.status, 0) + 1
            raise

    def connect(self, transport: Transport, handshake: Handshake, granted: Admission) -> Connection:
        """Register an accepted WebSocket with the hub (it joins no room yet)."""
        conn = Connection(
            handshake.connection_id,
            granted.identity,
            transport,
            max_buffered=self.settings.limits.max_buffered_bytes,
            default_room=handshake.room,
        )
        self.counters.connections_accepted += 1
        self.hub.add(conn)
        return conn

    # -- membership ---------------------------------------------------------------

    async def join(
        self, conn: Connection, room: str, catchup: Catchup, greet: Callable[[], object]
    ) -> None:
        """Join ``conn`` to ``room``: ``greet()``, the catch-up asked for, then
        live messages in offset order (see ``Timeline.attach``)."""
        if self.hub.join(conn, room, live=False):
            self.timeline.open(room)
            self.backend.subscribe(room)
        await self.timeline.attach(conn, room, catchup, greet)
        if room in conn.rooms and not self.hub.is_waiting(conn, room):
            self.presence.join(conn, room)

    def leave(self, conn: Connection, room: str) -> None:
        self.presence.leave(conn, room)
        if self.hub.leave(conn, room):
            self._close_room(room)

    def disconnect(self, conn: Connection, client_code: int | None = None) -> None:
        """The connection's socket is gone: forget it everywhere (idempotent).
        ``client_code``: the close code of the client's Close, when the client
        closed first (else the server's ``conn.close_code`` is counted)."""
        self.presence.drop(conn)
        for room in self.hub.remove(conn):
            self._close_room(room)
        if conn.state is ConnectionState.CLOSED:
            return
        conn.closed()
        code = client_code if client_code is not None else conn.close_code
        label = close_label(code)
        closed = self.counters.closed
        closed[label] = closed.get(label, 0) + 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "connection %s closed (%s)",
                conn.id,
                label,
                extra={"connection_id": conn.id, "close_code": label, "rooms": list(conn.rooms)},
            )

    def _close_room(self, room: str) -> None:
        self.timeline.close(room)
        self.backend.unsubscribe(room)

    # -- publishing ---------------------------------------------------------------

    def message_id(self, room: str | None, key: str | None = None) -> str:
        """The id of a new message: fresh, unique across pods; or, for a
        message with a key, the same for every resend of it, on any pod (so
        a duplicate's ack names the stored message)."""
        if key is None:
            return self.new_message_id()
        named = f"{room}\0{key}".encode()
        return "k-" + hashlib.blake2b(named, digest_size=10).hexdigest()

    def publish(
        self,
        message: Message,
        done: OnAppended | None = None,
        *,
        key: str | None = None,
        local_fallback: bool = True,
        scope: str | None = None,
    ) -> None:
        """Send a message to its room (or, with no room, to everyone) on every pod.

        A room message is stamped, stored and published by the backend and
        delivered here in offset order; ``done`` gets its ``Stamp`` (with
        ``duplicate`` set for a ``key`` stored already), or why there is
        none (``Unstored``). A message that could not be stored (``FAILED``)
        still reaches this pod's members without offset, with
        ``local_fallback``; if the answer was lost on the way (``UNKNOWN``:
        it may have been stored), the room is read again instead, so it
        arrives once, in order, if it was stored. A global message has no
        stamp and takes no key: ``done`` is not called. ``scope`` names where
        it came from in the counters (default: ``room`` or ``global``; the
        HTTP API says ``api``).
        """
        room = message.room
        published = self.counters.published
        scope = scope or ("global" if room is None else "room")
        published[scope] = published.get(scope, 0) + 1
        if room is None:
            self.backend.publish(None, message.encode())
            return
        self.backend.append(message, self._appended(message, done, local_fallback), key=key)

    def _appended(
        self, message: Message, done: OnAppended | None, local_fallback: bool
    ) -> OnAppended:
        room = message.room
        assert room is not None  # only room messages are appended

        def outcome(result: Stamp | Unstored) -> None:
            if result is Unstored.UNKNOWN:
                self.timeline.counters.unknown += 1
                self.timeline.reread(room)
            elif result is Unstored.FAILED and local_fallback:
                self.timeline.counters.unstamped += 1
                self.on_message(room, message.encode())
            if done is not None:
                done(result)

        return outcome

    # -- BackendHandler -------------------------------------------------------------

    def on_entry(self, room: str, entry: Entry) -> None:
        self.timeline.offer(room, entry)

    def on_message(self, room: str | None, payload: bytes) -> None:
        if room is None and payload.startswith(CONTROL_PREFIX):
            self.users.on_control(payload)
            return
        if self.hub.broadcast(room, payload):
            self.delivery_lag.observe_lag(payload)

    def on_ready(self, room: str) -> None:
        self.timeline.ready(room)

    # -- stats --------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return self.backend.state in (LinkState.LOCAL_ONLY, LinkState.CONNECTED)

    @property
    def backend_roundtrip(self) -> Histogram | None:
        """Seconds per round trip of the backend's publisher (one pipelined
        batch), if it has one (Redis: yes; local-only: None)."""
        found = getattr(self.backend, "roundtrip", None)
        return found if isinstance(found, Histogram) else None

    def stats(self) -> dict[str, Any]:
        """This pod's parts, as the stats endpoint shows them."""
        hub = self.hub.counters
        rooms = self.hub.room_sizes()
        return {
            "pod": self.pod_id,
            "uptime_s": round(time.monotonic() - self.counters.started, 3),
            "draining": self.draining,
            "connections": {
                "open": self.hub.connection_count,
                "accepted": self.counters.connections_accepted,
            },
            "rooms": rooms,
            "room_count": len(rooms),
            "messages": {
                "received": self.counters.messages_received,
                "broadcasts": hub.broadcasts,
                "delivered": hub.deliveries,
            },
            "errors_sent": self.counters.errors_sent,
            "slow_client_disconnects": hub.slow_client_disconnects,
            "refused": {str(status): n for status, n in sorted(self.counters.refused.items())},
            "rate_limited": self.counters.rate_limited,
            "policy_closes": {
                "rate_limit": self.counters.closed_rate_abuse,
                "token_expired": self.counters.closed_expired,
            },
            "refreshed": self.counters.refreshed,
            "broadcaster": dict(self.backend.stats()),
            "timeline": self.timeline.stats(),
            "presence": self.presence.stats(),
            "users": self.users.stats(),
        }
