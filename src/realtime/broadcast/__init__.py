"""Cross-pod fan-out: the ``Broadcaster`` contract and its implementations."""

from __future__ import annotations

from .base import Broadcaster, Deliver, LinkState
from .memory import MemoryBroadcaster
from .redis import RedisBroadcaster

__all__ = ["Broadcaster", "Deliver", "LinkState", "MemoryBroadcaster", "RedisBroadcaster"]
