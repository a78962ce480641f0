"""The exception tree of the ``realtime`` library.

::

    RealtimeError                      base of everything raised here
    ├── ProtocolError (ValueError)     a client frame broke the wire protocol;
    │                                  carries the error ``code`` sent back
    ├── Refused                        a connection refused before the upgrade
    │                                  (the client's fault, or the pod is full
    │                                  or draining); carries the HTTP status
    ├── StateError (RuntimeError)      an illegal state transition (a bug in
    │                                  the caller, never the client's fault)
    └── BroadcastError                 the cross-pod link failed; raised only
                                       inside broadcasters, never to senders

Errors say whose fault they are: a ``ProtocolError`` is the remote client's
and is answered with an error frame; a ``Refused`` is answered with its HTTP
status; a ``StateError`` is ours.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["BroadcastError", "ProtocolError", "RealtimeError", "Refused", "StateError"]


class RealtimeError(Exception):
    """Base class of every exception raised by ``realtime``."""


class ProtocolError(RealtimeError, ValueError):
    """A client frame broke the protocol.

    ``code`` is the machine-readable error code sent to the client in an
    ``error`` frame, ``ref`` the client's reference when it could be read.
    """

    def __init__(self, code: str, message: str, *, ref: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


class Refused(RealtimeError):
    """A WebSocket upgrade is refused: answered with HTTP ``status`` and
    ``reason`` as the body (safe to show: never a token), plus ``headers``
    (``WWW-Authenticate``, ``Retry-After``)."""

    def __init__(
        self, status: int, reason: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers: Mapping[str, str] = headers or {}


class StateError(RealtimeError, RuntimeError):
    """An object was asked to make a transition its state does not allow."""


class BroadcastError(RealtimeError):
    """The link to the cross-pod transport failed."""
