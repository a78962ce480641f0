"""The backend contract: what links the pods of one deployment.

A backend carries two kinds of traffic between pods and reports both to the
``BackendHandler`` it was started with (the pod's ``Node``) **on every pod,
the sending one included**, so that one path delivers everything:

- *room entries*: ``append`` stamps a room message with the room's next
  offset and epoch, stores it in the room's history and publishes it; every
  pod subscribed to the room gets ``on_entry`` (the appending pod at the
  latest when the append completes, before its ``done``);
- *unordered messages*: ``publish`` (messages to everyone, presence events);
  every pod subscribed gets ``on_message`` (global ones reach every pod).

A pod subscribes to the rooms it hosts (``subscribe``/``unsubscribe``); once
it is sure to receive every later entry of a room it gets ``on_ready``
(after each resubscription too). The backend also reads a room's stored
history (``read``) and keeps presence (``presence``). Implementations:
``MemoryBackend`` (one pod, no Redis) and ``RedisBackend``.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import orjson

from ..core.protocol import Message
from ..core.sequencer import Entry

__all__ = [
    "PRESENCE_BURST",
    "Backend",
    "BackendHandler",
    "LinkState",
    "Member",
    "OnAppended",
    "PresenceStore",
    "Slice",
    "Stamp",
    "Unstored",
    "content_digest",
    "data_digest",
    "key_field",
    "new_epoch",
]


class LinkState(enum.StrEnum):
    """State of the link to other pods, as shown in stats and ``/readyz``."""

    LOCAL_ONLY = "local-only"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Stamp:
    """Where a room message landed: its room offset and epoch.

    ``duplicate`` is true when an idempotency key matched an earlier
    message: nothing new was stored and the stamp is the earlier one's.
    ``replicated`` is false when the backend waits for replicas
    (``wait_replicas``) and too few confirmed it in time: it is stored and
    delivered, but a failover of its primary may lose it.
    """

    epoch: str
    offset: int
    duplicate: bool = False
    replicated: bool = True


class Unstored(enum.Enum):
    """Why an append has no stamp to give."""

    FAILED = "failed"
    """The message never reached the store (link down, queue full): it is
    nowhere but on this pod."""
    UNKNOWN = "unknown"
    """It was sent, but the answer was lost with the connection: it may have
    been stored and published, or not."""
    CONFLICT = "conflict"
    """Its key is stored already, for a message with other content: this one
    is not stored (a key names one message, whatever the retries)."""


OnAppended = Callable[[Stamp | Unstored], None]
"""Told the outcome of ``Backend.append``: the stamp, or why there is none;
called exactly once."""


@dataclass(frozen=True, slots=True)
class Slice:
    """A read of a room's stored history."""

    epoch: str | None
    """The room's current epoch (None: the room has no stored state)."""
    newest: int
    """The last offset assigned in this epoch (0: none)."""
    first: int
    """The oldest offset still stored (``newest + 1`` when none is)."""
    entries: tuple[Entry, ...]
    """Stored entries after the offset asked for, oldest first."""


def key_field(message: Message, key: str) -> str:
    """How a message's key is stored. A key names one message in its room,
    whoever sends it: a resend after a reconnect comes from a new connection
    (a guest's even has a new id), so keys are not scoped by sender; clients
    make them unique (random)."""
    return key


def content_digest(message: Message) -> str:
    """What a key's message carried (the data its sender sent): a resend
    carries the same, another message under the same key does not."""
    return message.digest or data_digest(message.data)


def data_digest(data: Any) -> str:
    """The digest of a message's data (``content_digest``)."""
    return hashlib.blake2b(orjson.dumps(data), digest_size=12).hexdigest()


def new_epoch() -> str:
    """A fresh random epoch: 16 hex digits (what a room's stored state is
    called until it is lost; see ``Slice.epoch``)."""
    return os.urandom(8).hex()


# -- presence -------------------------------------------------------------------

PRESENCE_BURST = 10
"""More join/leave events than this for one room in one update (a mass
reconnect) are replaced by one ``presence`` frame with the member list."""


@dataclass(frozen=True, slots=True)
class Member:
    """One user present in a room; ``since`` in ms since the epoch."""

    id: str
    name: str
    since: int

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "since": self.since}


class PresenceStore(Protocol):
    """Where every pod's presence is kept (the backend's)."""

    async def update(self, room: str, joins: list[Member], leaves: list[str]) -> list[bytes]:
        """Record this pod's changes to ``room``; return the event frames
        this pod must deliver locally (the store carries them to the other
        pods itself). Raises ``BroadcastError``."""

    async def refresh(self, rooms: list[str]) -> list[tuple[str, bytes]]:
        """Keep this pod's entries alive and prune dead pods' entries;
        return ``(room, event)`` frames to deliver locally."""

    async def members(self, room: str) -> list[Member]:
        """Everyone present in ``room`` on any live pod, one entry per user."""


# -- the contract -------------------------------------------------------------------


class BackendHandler(Protocol):
    """What a backend reports to (the node), on every pod."""

    def on_entry(self, room: str, entry: Entry) -> None:
        """A room entry reached this pod (its own or another pod's)."""

    def on_message(self, room: str | None, payload: bytes) -> None:
        """An unordered message for a room's members (None: everyone)."""

    def on_ready(self, room: str) -> None:
        """Every entry appended to ``room`` from now on will reach
        ``on_entry``: after the first subscription and each resubscription."""


@runtime_checkable
class Backend(Protocol):
    """The link between pods, and the store of room offsets and history."""

    @property
    def state(self) -> LinkState:
        """Where the link to other pods stands."""

    async def start(self, handler: BackendHandler) -> None:
        """Begin reporting to ``handler``; returns once started, even if
        the link is down (it keeps trying)."""

    async def stop(self) -> None:
        """Unsubscribe, close every connection and task; idempotent."""

    def subscribe(self, room: str) -> None:
        """This pod now has members in ``room``: receive its traffic."""

    def unsubscribe(self, room: str) -> None:
        """This pod has no members in ``room`` any more."""

    def publish(self, room: str | None, payload: bytes) -> None:
        """Carry an unordered message to ``room`` (None: everyone) on every
        pod, this one included. Never raises for link trouble and never
        blocks: failures are counted in stats."""

    def append(self, message: Message, done: OnAppended, *, key: str | None = None) -> None:
        """Stamp, store and publish a room message; never blocks or raises
        for link trouble. ``done`` gets the outcome, in append order. A
        ``key`` already stored in the room is not stored again: ``done`` gets
        the first message's stamp with ``duplicate`` set, or
        ``Unstored.CONFLICT`` if that message carried other data
        (``content_digest``)."""

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Slice:
        """Stored entries of ``room`` with offset > ``after`` (at most
        ``limit``); ``after=-1``: the newest ``limit`` entries. If ``epoch``
        is given and the room's epoch differs, reads from the start of the
        current epoch. Raises ``BroadcastError`` when the store cannot be
        reached."""

    async def claim(self, name: str, value: str, ttl: float) -> str | None:
        """Claim ``name`` for ``ttl`` seconds, across pods: None if this call
        claimed it (storing ``value``), else the ``value`` of the claim that
        came first. Raises ``BroadcastError`` when the store cannot be
        reached. (What the HTTP API's idempotency keys rest on.)"""

    def presence(self, ttl: float) -> PresenceStore:
        """The presence store of this backend; a pod's entries vanish
        ``ttl`` seconds after it stops refreshing them."""

    def stats(self) -> Mapping[str, object]:
        """Counters and state for the stats endpoint (no secrets)."""
