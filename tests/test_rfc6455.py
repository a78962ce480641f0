"""The aiohttp transport's RFC 6455 server frames (header lengths, close
frames) and its reading of whole client text frames."""

from __future__ import annotations

import struct

import pytest

from realtime.transports.rfc6455 import (
    PING_FRAME,
    close_frame,
    pong_frame,
    text_frame,
    text_payloads,
)

from .support import OP_BINARY, OP_PING, OP_TEXT, client_frame


@pytest.mark.parametrize(("size", "header"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_text_frame_header_lengths(size: int, header: int) -> None:
    payload = b"x" * size
    frame = text_frame(payload)
    assert frame[0] == 0x81  # FIN + text, unmasked
    assert len(frame) == header + size
    assert frame.endswith(payload)
    if header == 4:
        assert struct.unpack("!H", frame[2:4])[0] == size
    if header == 10:
        assert struct.unpack("!Q", frame[2:10])[0] == size


def test_close_frame() -> None:
    frame = close_frame(1013, "slow")
    assert frame == b"\x88\x06" + struct.pack("!H", 1013) + b"slow"
    assert len(close_frame(1000, "x" * 500)) == 2 + 125


def test_control_frames() -> None:
    assert PING_FRAME == b"\x89\x00"
    assert pong_frame(b"abc") == b"\x8a\x03abc"


def test_whole_text_frames_are_read_and_unmasked() -> None:
    payloads = [b"", b"a", b"abcd", b'{"type": "ping"}', "h\u00e9 \u2603".encode(), b"x" * 300]
    data = b"".join(client_frame(OP_TEXT, p) for p in payloads)
    assert text_payloads(data, 1000) == payloads


@pytest.mark.parametrize(
    "data",
    [
        client_frame(OP_TEXT, b"abc", mask=False),  # unmasked: refused by the parser
        client_frame(OP_TEXT, b"abc")[:-1],  # cut by the read
        client_frame(OP_TEXT, b"abc") + client_frame(OP_TEXT, b"de")[:3],
        client_frame(OP_TEXT, b"abc") + client_frame(OP_PING, b""),  # a control frame
        client_frame(OP_BINARY, b"abc"),
        bytes([0x01]) + client_frame(OP_TEXT, b"abc")[1:],  # a first fragment (no FIN)
        bytes([0xC1]) + client_frame(OP_TEXT, b"abc")[1:],  # an extension bit
        client_frame(OP_TEXT, b"\xff\xfe"),  # not UTF-8: the parser closes with 1007
        client_frame(OP_TEXT, b"x" * 70_000),  # a 64-bit length
        client_frame(OP_TEXT, b"x" * 2000),  # over the limit
    ],
)
def test_anything_else_is_left_to_the_parser(data: bytes) -> None:
    assert text_payloads(data, 1000) is None
