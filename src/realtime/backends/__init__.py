"""Cross-pod fan-out: the ``Broadcaster`` contract and its implementations."""

from __future__ import annotations

from .base import (
    Broadcaster,
    Deliver,
    LinkState,
    LogSink,
    OrderedBroadcaster,
    RoomLog,
    Slice,
    Stamp,
    Stamped,
    Unstored,
)
from .memory import MemoryBroadcaster
from .redis.backend import RedisBroadcaster

__all__ = [
    "Broadcaster",
    "Deliver",
    "LinkState",
    "LogSink",
    "MemoryBroadcaster",
    "OrderedBroadcaster",
    "RedisBroadcaster",
    "RoomLog",
    "Slice",
    "Stamp",
    "Stamped",
    "Unstored",
]
