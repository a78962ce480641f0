"""Screening: the application's say over a client's message before it is sent.

A ``Screen`` is the node's optional publish hook (``Node(screen=...)``). The
session calls it with a ``Submission`` — what a client asked to send, to
which room, as whom — after the frame was checked (the room joined, the
rate limit) and before anything is stored or delivered. It answers with a
``Decision``:

- ``ACCEPT``: send the message as the client wrote it;
- ``Replace(data)``: send ``data`` instead (a word filter's cleaned text);
- ``Reject(code, message)``: send nothing; the client gets an ``error``
  frame with that code and message and its ``ref``.

The session awaits the screen before it reads the client's next frame, so
one client's messages keep their order and its acks their refs. A key's
identity stays with what the client sent: a resend of the same data under
the same key is a duplicate even when the first one was replaced. The
screen is asked again for a resend (it may answer differently; the key
tells it that it is one). A connection whose ``Admission`` is ``trusted``
skips the screen. Nothing here does I/O: the screen itself may (an HTTP
call to the team's app, with its own timeout and failure policy).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from .protocol import Identity

__all__ = ["ACCEPT", "Accept", "Decision", "Reject", "Replace", "Screen", "Submission"]


@dataclass(frozen=True, slots=True)
class Submission:
    """A client's message as the screen sees it, before it is sent."""

    room: str | None
    """Its room; None: the global channel (everyone, not stored)."""
    sender: Identity
    data: Any
    """The ``data`` the client sent (decoded JSON)."""
    key: str | None
    """The client's idempotency key (a resend has the same one)."""
    connection_id: str


class Accept(enum.Enum):
    """Send the message as the client wrote it."""

    ACCEPT = "accept"


ACCEPT: Final = Accept.ACCEPT


@dataclass(frozen=True, slots=True)
class Replace:
    """Send ``data`` instead of what the client wrote."""

    data: Any


@dataclass(frozen=True, slots=True)
class Reject:
    """Send nothing; the client gets an ``error`` frame with ``code`` and ``message``."""

    code: str
    message: str


Decision = Accept | Replace | Reject

Screen = Callable[[Submission], Awaitable[Decision]]
"""Decide what becomes of a client's message (see the module docstring)."""
