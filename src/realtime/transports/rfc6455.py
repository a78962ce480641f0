"""The server's side of RFC 6455 framing, for transports that write raw bytes.

Server frames are never masked (section 5.1), so without compression a text
frame's bytes are the same for every recipient: a broadcast builds them once
(``Outgoing.encoded(text_frame)``) and writes the same bytes to every
member's socket.

One reading helper: ``text_payloads`` takes a read that holds nothing but
whole, unfragmented text frames (what a chat client sends) and unmasks them,
so that the aiohttp transport can hand them to the session at once; any
other read (control frames, fragments, a frame cut by the read) is left to
aiohttp's parser, which handles everything.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["PING_FRAME", "close_frame", "pong_frame", "text_frame", "text_payloads"]

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


def text_payloads(data: bytes, limit: int) -> list[bytes] | None:
    """The payloads of ``data`` if it is nothing but whole client text
    frames, each a message of its own (FIN set, no extension bits, masked)
    of valid UTF-8 and at most ``limit`` bytes, unmasked; else None (the
    read is for a full parser: a control frame, a fragment, a frame cut by
    the read, a 64-bit length, a broken frame)."""
    texts = []
    n = len(data)
    pos = 0
    while pos < n:
        if n - pos < 6 or data[pos] != _TEXT:  # FIN + text, no RSV bits
            return None
        second = data[pos + 1]
        length = second & 0x7F
        if second < 0x80 or length == 127:
            return None
        if length == 126:
            if n - pos < 8:
                return None
            length = (data[pos + 2] << 8) | data[pos + 3]
            pos += 4
        else:
            pos += 2
        end = pos + 4 + length
        if end > n or length > limit:
            return None
        payload = data[pos + 4 : end]
        if length:
            mask = data[pos : pos + 4] * ((length >> 2) + 1)
            payload = (
                int.from_bytes(payload, "little") ^ int.from_bytes(mask[:length], "little")
            ).to_bytes(length, "little")
            if not payload.isascii():
                try:
                    payload.decode()
                except UnicodeDecodeError:
                    return None  # the parser's to refuse (1007)
        texts.append(payload)
        pos = end
    return texts
