"""The contract between a pod and the transport that links pods.

A broadcaster takes every message sent on this pod (``publish``), delivers
it to this pod's members through the ``Deliver`` callback it was started
with, and carries it to the other pods, which deliver it to theirs. The hub
tells it which rooms have local members (``subscribe``/``unsubscribe``) so it
only listens for rooms this pod hosts. Neither the hub nor the handler knows
which implementation is in use.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..core.protocol import Message
from ..core.sequencer import Entry

__all__ = [
    "Broadcaster",
    "Deliver",
    "LinkState",
    "LogSink",
    "OrderedBroadcaster",
    "RoomLog",
    "Slice",
    "Stamp",
    "Stamped",
    "Unstored",
    "new_epoch",
]

Deliver = Callable[[str | None, bytes], int]
"""Hand a client-ready JSON payload to local members of a room (None: all)."""


class LinkState(enum.StrEnum):
    """State of the link to other pods, as shown in stats and ``/readyz``."""

    LOCAL_ONLY = "local-only"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


@runtime_checkable
class Broadcaster(Protocol):
    """Cross-pod fan-out. Implementations: ``MemoryBroadcaster``, ``RedisBroadcaster``."""

    @property
    def state(self) -> LinkState:
        """Where the link to other pods stands."""

    async def start(self, deliver: Deliver) -> None:
        """Begin delivering; returns once started, even if the link is down."""

    async def stop(self) -> None:
        """Unsubscribe, close every connection and task; idempotent."""

    def publish(self, message: Message) -> None:
        """Deliver ``message`` locally and to every other pod. Never raises
        for link trouble and never blocks: failures are counted in stats."""

    def subscribe(self, room: str) -> None:
        """This pod now has members in ``room``: receive its messages."""

    def unsubscribe(self, room: str) -> None:
        """This pod has no members in ``room`` any more."""

    def stats(self) -> Mapping[str, object]:
        """Counters and state for ``/ws/stats`` (no secrets)."""


# -- room log: offsets, history -------------------------------------------------


def new_epoch() -> str:
    """A fresh random epoch: 16 hex digits (what a room's stored state is
    called until it is lost; see ``Slice.epoch``)."""
    return os.urandom(8).hex()


@dataclass(frozen=True, slots=True)
class Stamp:
    """Where a room message landed: its room offset and epoch.

    ``duplicate`` is true when an idempotency key matched an earlier
    message: nothing new was published and the stamp is the earlier one's.
    """

    epoch: str
    offset: int
    duplicate: bool = False


class Unstored(enum.Enum):
    """Why ``RoomLog.append`` has no stamp to give."""

    FAILED = "failed"
    """The message never reached the store (link down, queue full): it is
    nowhere but on this pod."""
    UNKNOWN = "unknown"
    """It was sent, but the answer was lost with the connection: it may have
    been stored and published, or not."""


Stamped = Callable[[Stamp | Unstored], None]
"""Told the outcome of ``RoomLog.append``: the stamp, or why there is none;
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


class LogSink(Protocol):
    """Where a room log reports to (the pod's ``Timeline``)."""

    def entry(self, room: str, entry: Entry) -> None:
        """A room entry reached this pod (its own or another pod's)."""

    def ready(self, room: str) -> None:
        """Every entry appended to ``room`` from now on will reach ``entry``:
        after the first subscription and again after each resubscription."""


class RoomLog(Protocol):
    """Per-room offsets and history: the half of a broadcaster that orders.

    ``append`` assigns the room's next offset, stores the message in the
    room's history and publishes it to every pod, atomically; every pod's
    sink then gets the entry (the appending pod at the latest when the
    append completes).
    """

    def attach(self, sink: LogSink) -> None:
        """Set where entries and readiness are reported; before ``start``."""

    def append(
        self, message: Message, done: Stamped, *, idempotency_key: str | None = None
    ) -> None:
        """Stamp, store and publish a room message; never blocks or raises
        for link trouble. ``done`` gets the stamp (or None) in append order."""

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Slice:
        """Stored entries of ``room`` with offset > ``after`` (at most
        ``limit``); ``after=-1``: the newest ``limit`` entries. If ``epoch``
        is given and the room's epoch differs, reads from the start of the
        current epoch. Raises ``BroadcastError`` when the store cannot be
        reached."""


class OrderedBroadcaster(Broadcaster, RoomLog, Protocol):
    """A broadcaster that is also the room log (both implementations are)."""
