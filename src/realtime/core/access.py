"""What the ``identify`` hook may decide about a connection beyond who it is.

The handler knows nothing of tokens. An application that authenticates
clients returns an ``Admission`` from its ``identify`` hook: the identity,
when the credential stops being valid (the handler closes the connection
then with 1008 "token expired"), and which rooms it may join. A hook that
only names the client may keep returning a bare ``Identity``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .protocol import Identity

__all__ = ["Admission", "RoomCheck", "admission"]

RoomCheck = Callable[[str | None], bool]
"""May this connection be in ``room``? ``None`` stands for the global channel."""


@dataclass(frozen=True, slots=True)
class Admission:
    """A connection the ``identify`` hook let in, and on what terms."""

    identity: Identity
    expires_at: float | None = None
    """Unix time at which the credential expires; None: never."""
    may_join: RoomCheck | None = None
    """Room authorization; None: every room."""

    def allows(self, room: str | None) -> bool:
        return self.may_join is None or self.may_join(room)


def admission(decided: Identity | Admission) -> Admission:
    """An ``Admission`` for whatever the hook returned."""
    return decided if isinstance(decided, Admission) else Admission(decided)
