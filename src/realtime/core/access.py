"""Who may connect: the handshake, the ``Identify`` hook, and what it decides.

A transport reads an upgrade request into a ``Handshake`` (the room in the
path, the catch-up asked for, the query and the headers), whatever web
server it came from. The application's ``Identify`` hook looks at it and
returns who the client is, or refuses it by raising ``Refused`` (answered
with that HTTP status before the WebSocket is accepted). It may return a
bare ``Identity`` or an ``Admission``: the identity, when its credential
stops being valid (the connection is closed then with 1008 "token
expired"), which rooms it may join, whether its messages skip the
node's publish screen (``trusted``) and what its welcome frame shows.
``guest_identity`` is the hook when nobody authenticates clients.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .exceptions import ProtocolError, Refused
from .protocol import NO_CATCHUP, Catchup, ErrorCode, Identity, parse_catchup, validate_room

__all__ = [
    "MAX_NAME_LENGTH",
    "Admission",
    "Handshake",
    "Identify",
    "Reauthorize",
    "RoomCheck",
    "admission",
    "clean_name",
    "guest_identity",
    "guest_name",
    "read_handshake",
]

RoomCheck = Callable[[str | None], bool]
"""May this connection be in ``room``? ``None`` stands for the global channel."""


@dataclass(frozen=True, slots=True)
class Admission:
    """A connection the ``Identify`` hook let in, and on what terms."""

    identity: Identity
    expires_at: float | None = None
    """Unix time at which the credential expires; None: never."""
    may_join: RoomCheck | None = None
    """Room authorization; None: every room."""
    trusted: bool = False
    """Its messages skip the node's publish ``Screen``."""
    data: Any = None
    """Shown to the client in its ``welcome`` frame (``data``); None: not shown."""
    subject: str | None = None
    """Whom the credential names (a token's ``sub``), where that is not
    ``identity.id`` (an app's hook chose the identity); a ``refresh`` must
    name the same."""

    @property
    def holder(self) -> str:
        """Whom the credential names: ``subject``, else the identity's id."""
        return self.identity.id if self.subject is None else self.subject

    def allows(self, room: str | None) -> bool:
        return self.may_join is None or self.may_join(room)


def admission(decided: Identity | Admission) -> Admission:
    """An ``Admission`` for whatever the hook returned."""
    return decided if isinstance(decided, Admission) else Admission(decided)


@dataclass(frozen=True, slots=True)
class Handshake:
    """A WebSocket upgrade request, as every transport describes it."""

    connection_id: str
    """The id the connection will have (fresh for every request)."""
    room: str | None
    """The room in the path (already a valid room name); None: the global channel."""
    catchup: Catchup
    """What the query string asks to catch up on (``since``/``epoch``, ``history``)."""
    query: Mapping[str, str]
    headers: Mapping[str, str]
    """Request headers; look them up by their lower-case name."""
    remote: str | None = None
    """The client's address, as the web server saw it."""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


Identify = Callable[[Handshake], Awaitable[Identity | Admission]]
"""Decide who a new connection is, or refuse it by raising ``Refused``."""

Reauthorize = Callable[[str, Admission], Awaitable[Admission]]
"""The terms a fresh credential (a ``refresh`` frame's token) grants a
connection admitted on the given terms, or ``Refused`` (its reason is told
to the client) if it grants none. The session checks that both name the
same ``holder``."""


def read_handshake(
    connection_id: str,
    room: str | None,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    remote: str | None = None,
) -> Handshake:
    """Validate the room of the path and the catch-up of the query string;
    ``Refused`` (HTTP 400) if either is invalid."""
    if room is None:
        return Handshake(connection_id, None, NO_CATCHUP, query, headers, remote)
    try:
        validate_room(room)
        catchup = _query_catchup(query)
    except ProtocolError as exc:
        raise Refused(400, exc.message) from exc
    return Handshake(connection_id, room, catchup, query, headers, remote)


def _query_catchup(query: Mapping[str, str]) -> Catchup:
    """``since``/``epoch`` or ``history`` from the query string."""

    def number(name: str) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return None
        # ASCII digits only: str.isdigit() takes '²' (which int() refuses)
        # and int() takes other scripts' digits ('٣'), neither of them ours.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
            raise ProtocolError(
                ErrorCode.INVALID_FRAME, f"{name!r} must be a non-negative integer (ASCII digits)"
            )
        return int(raw)

    return parse_catchup(number("since"), query.get("epoch") or None, number("history"))


_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]+")
MAX_NAME_LENGTH = 32


def clean_name(raw: str | None) -> str:
    """A display name with control and invisible characters removed, white
    space folded and the length capped; empty if nothing is left."""
    if not raw:
        return ""
    return " ".join(_NAME_JUNK.sub(" ", raw).split())[:MAX_NAME_LENGTH]


async def guest_identity(handshake: Handshake) -> Identity:
    """The identity of an unauthenticated client: the ``name`` query
    parameter, cleaned, or a generated guest name."""
    connection_id = handshake.connection_id
    name = clean_name(handshake.query.get("name")) or guest_name(connection_id)
    return Identity(id=f"guest-{connection_id}", name=name)


def guest_name(connection_id: str) -> str:
    """A short name for a guest, unique across pods: the first four hex
    digits of the connection id's random per-pod prefix, then its counter
    (``a1b2c3d4e5-1f`` → ``guest-a1b2-1f``). Two pods share a name only if
    their prefixes share those digits (1 in 65,536 per pair of pods)."""
    prefix, dash, counter = connection_id.rpartition("-")
    if not dash:
        return f"guest-{connection_id[:12]}"
    return f"guest-{prefix[:4]}-{counter}"
