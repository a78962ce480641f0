"""The server's side of RFC 6455 framing, for transports that write raw bytes.

Server frames are never masked (section 5.1), so without compression a text
frame's bytes are the same for every recipient: a broadcast builds them once
(``Outgoing.encoded(text_frame)``) and writes the same bytes to every
member's socket.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["PING_FRAME", "close_frame", "pong_frame", "text_frame"]

_TEXT: Final = 0x81  # FIN + text opcode
_CLOSE: Final = 0x88  # FIN + close opcode
_PING: Final = 0x89  # FIN + ping opcode
_PONG: Final = 0x8A  # FIN + pong opcode


def _frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    """An unmasked, uncompressed server-to-client text frame (RFC 6455 5.2).

    Server frames are never masked, so without compression the bytes are the
    same for every recipient: a broadcast builds them once and writes them to
    every member's transport.
    """
    return _frame(_TEXT, payload)


def close_frame(code: int, reason: str) -> bytes:
    """A server-to-client close frame; the reason is cut to fit 123 bytes."""
    return _frame(_CLOSE, struct.pack("!H", code) + reason.encode()[:123])


def pong_frame(payload: bytes) -> bytes:
    """The pong answering a client's ping: the same payload (at most 125
    bytes: the frame reader refuses longer control frames)."""
    return _frame(_PONG, payload)


PING_FRAME: Final = _frame(_PING, b"")
"""A server ping without payload (the keepalive's)."""
