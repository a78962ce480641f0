"""The client's exceptions, one tree::

    ClientError                 anything this client raises on purpose
    ├── ConnectError            could not connect at all (first connection)
    │   └── Refused             the server said no before the upgrade (HTTP 4xx)
    ├── ClientClosed            the client is closed (by the caller, or for good
    │                           by the server: 1008, 4000-4999, a refusal)
    ├── SendError               the server refused a message (its error code)
    └── JoinError               the server refused a join (its error code)

``ConnectError`` and ``ClientClosed`` are about the link; ``SendError`` and
``JoinError`` name the frame the server refused and why (``code`` is the
server's error code, docs/protocol.md "Error codes").
"""

from __future__ import annotations

__all__ = ["ClientClosed", "ClientError", "ConnectError", "JoinError", "Refused", "SendError"]


class ClientError(Exception):
    """The root of what chat_api.client raises."""


class ConnectError(ClientError, ConnectionError):
    """No connection could be made to any of the client's URLs."""


class Refused(ConnectError):
    """The server refused the handshake with HTTP ``status`` (401: token
    missing or bad; 403: origin or room not allowed; 400/404: wrong URL).
    ``detail`` is the server's one-line reason when it could be read."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        self.url = url
        self.status = status
        self.detail = detail
        super().__init__(f"{url}: refused with HTTP {status}" + (f": {detail}" if detail else ""))


class ClientClosed(ClientError):
    """The client is closed and does no more; ``code``/``reason`` say why
    (the close code, or None for a refusal or the caller's own close)."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(message)


class _Refusal(ClientError):
    def __init__(self, code: str, message: str, room: str | None) -> None:
        self.code = code
        self.message = message
        self.room = room
        super().__init__(f"{code}: {message}" if message else code)


class SendError(_Refusal):
    """The server refused a message (``key_conflict``, ``not_in_room``,
    ``too_large``, ``forbidden_room``…): it was not stored and is not resent."""


class JoinError(_Refusal):
    """The server refused to let the client into ``room``
    (``forbidden_room``, ``too_many_rooms``, ``invalid_room``…)."""
