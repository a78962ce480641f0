"""Redis Cluster slots: which of the 16384 a key or a shard channel is in."""

from __future__ import annotations

import binascii

__all__ = ["SLOTS", "key_slot"]

SLOTS = 16384


def key_slot(key: bytes) -> int:
    """The Cluster slot of ``key``: CRC16 (XMODEM, as Redis has it) of its
    hash tag (the text between the first ``{`` and the next ``}``, if not
    empty) or of the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS
