"""What a :class:`~chat_api.client.Client` hands its caller: small frozen
dataclasses, one per kind of event, and :class:`Ack` for a send.

``async for event in client`` yields the union :data:`Event`; match on the
class. Events the server may add later are not turned into new classes
silently: unknown frames are skipped (the protocol says clients must ignore
what they do not know).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = [
    "Ack",
    "Closed",
    "Disconnected",
    "EpochChanged",
    "Event",
    "Joined",
    "Left",
    "MemberJoined",
    "MemberLeft",
    "Message",
    "Presence",
    "PresenceMember",
    "Reconnected",
    "ServerError",
    "Unrecoverable",
    "User",
]


@dataclass(frozen=True, slots=True)
class User:
    """An identity as the server states it (``from`` of a message)."""

    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Message:
    """A message. Room messages carry ``offset`` and ``epoch`` (their place
    in the room); ``room`` is None for a message to everyone, and ``to`` is
    set for a message the server sent to one user. ``replayed``: it came in
    a catch-up (history on join, or a resume after a reconnect), not live."""

    room: str | None
    id: str
    sender: User
    ts: int
    data: Any
    offset: int | None = None
    epoch: str | None = None
    to: str | None = None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A user entered ``room`` (was in it on no pod before)."""

    room: str
    user: User
    ts: int


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A user left ``room`` (is in it on no pod any more)."""

    room: str
    user: User
    ts: int


@dataclass(frozen=True, slots=True)
class PresenceMember:
    """One entry of a presence list: ``since`` is when the user entered (ms)."""

    id: str
    name: str
    since: int


@dataclass(frozen=True, slots=True)
class Presence:
    """Who is in ``room`` on every pod: the answer to
    :meth:`~chat_api.client.Client.presence`, or sent unasked after a mass
    reconnect instead of many :class:`MemberJoined`."""

    room: str
    members: tuple[PresenceMember, ...]


@dataclass(frozen=True, slots=True)
class Joined:
    """The client is in ``room`` on the current connection (first join, and
    again after each reconnect)."""

    room: str
    resumed: bool


@dataclass(frozen=True, slots=True)
class Left:
    """The client is no longer in ``room`` and will not rejoin it: it asked
    (``reason`` None), or the server removed it or refused to take it back
    after a reconnect (``reason``: an error code such as ``forbidden_room``)."""

    room: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class EpochChanged:
    """The room's stored state was lost (Redis restarted or flushed, its
    history expired): offsets start again at 1 in ``epoch``. Messages of
    the ``previous`` epoch this client had not received yet may be lost; the
    server cannot say. After a resume this comes with an
    :class:`Unrecoverable` (``reason="epoch_changed"``)."""

    room: str
    previous: str | None
    epoch: str | None


@dataclass(frozen=True, slots=True)
class Unrecoverable:
    """Messages of ``room`` this client should have had and will never get.

    ``reason`` is the server's: ``window_exceeded`` (older than what the
    history keeps; ``lost`` says how many when known), ``epoch_changed``
    (the room's history was reset while the client was away),
    ``unknown_offset`` (the client's position is ahead of the room's: the
    store lost messages), ``unavailable`` (the pod could not read its store:
    live only from here), or ``gap`` (offsets skipped without the server
    saying so; ``lost`` is the count). ``after`` is the last offset the
    client had seen in ``epoch`` (0: none)."""

    room: str
    reason: str
    lost: int | None
    epoch: str | None
    after: int


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``error`` frame that no pending call of this client was waiting
    for (a send or a join raises :class:`~chat_api.client.SendError` /
    :class:`~chat_api.client.JoinError` instead). The connection stays open."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection to ``url`` was lost (``code``: the close code, 1006 when
    it went without one). ``reconnect_in``: seconds until the next attempt,
    None when the client will not reconnect (a :class:`Closed` follows)."""

    url: str
    code: int
    reason: str
    reconnect_in: float | None


@dataclass(frozen=True, slots=True)
class Reconnected:
    """Connected again, to ``url`` (pod ``pod``), after ``attempts`` tries.
    Joined rooms are being resumed; what was missed follows as replayed
    :class:`Message` events, and unacknowledged sends are resent."""

    url: str
    pod: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The last event: the client is closed for good. ``code``/``reason``:
    the close that ended it (1000 when the caller closed it), or the HTTP
    status of a refused handshake in ``status``. ``error``: what to tell a
    person, None after the caller's own close."""

    code: int | None
    reason: str
    status: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """The server took a sent message. ``offset``/``epoch``: its place in the
    room (None for a message to everyone, which is not stored).
    ``duplicate``: a message with this key was stored before (a resend).
    ``replicated``: False when fewer replicas than asked confirmed it."""

    id: str
    room: str | None
    key: str
    offset: int | None
    epoch: str | None
    duplicate: bool = False
    replicated: bool = True


Event: TypeAlias = (
    Message
    | MemberJoined
    | MemberLeft
    | Presence
    | Joined
    | Left
    | EpochChanged
    | Unrecoverable
    | ServerError
    | Disconnected
    | Reconnected
    | Closed
)
"""Everything ``async for event in client`` yields."""
