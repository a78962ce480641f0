"""The aiohttp transport's RFC 6455 server frames: header lengths, close frames."""

from __future__ import annotations

import struct

import pytest

from realtime.transports.rfc6455 import PING_FRAME, close_frame, pong_frame, text_frame


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
