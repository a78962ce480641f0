"""realtime: rooms, fan-out and cross-pod broadcast for WebSocket services.

The core (``protocol``, ``connection``, ``hub``) is pure and never awaits the
network; ``broadcast`` links pods; ``handler`` adapts it all to aiohttp.
This package imports nothing from ``chat_api``.
"""

from __future__ import annotations

from .backends import (
    Broadcaster,
    Deliver,
    LinkState,
    MemoryBroadcaster,
    OrderedBroadcaster,
    RedisBroadcaster,
    RoomLog,
    Stamp,
)
from .core.access import Admission, RoomCheck, admission
from .core.connection import Connection, ConnectionState, FrameSink
from .core.exceptions import BroadcastError, ProtocolError, RealtimeError, StateError
from .core.hub import LocalHub, RoomWatcher
from .core.protocol import Catchup, CloseCode, ErrorCode, Identity, Message
from .core.ratelimit import RateLimiter, Verdict
from .core.sequencer import Entry, RoomSequencer
from .rooms.presence import Member, MemoryPresence, Presence, PresenceBackend
from .rooms.timeline import Timeline, TimelineSettings
from .transports.aiohttp import Handler, HandlerSettings, Identify, guest_identity

__all__ = [
    "Admission",
    "BroadcastError",
    "Broadcaster",
    "Catchup",
    "CloseCode",
    "Connection",
    "ConnectionState",
    "Deliver",
    "Entry",
    "ErrorCode",
    "FrameSink",
    "Handler",
    "HandlerSettings",
    "Identify",
    "Identity",
    "LinkState",
    "LocalHub",
    "Member",
    "MemoryBroadcaster",
    "MemoryPresence",
    "Message",
    "OrderedBroadcaster",
    "Presence",
    "PresenceBackend",
    "ProtocolError",
    "RateLimiter",
    "RealtimeError",
    "RedisBroadcaster",
    "RoomCheck",
    "RoomLog",
    "RoomSequencer",
    "RoomWatcher",
    "Stamp",
    "StateError",
    "Timeline",
    "TimelineSettings",
    "Verdict",
    "admission",
    "guest_identity",
]
