"""realtime: rooms, fan-out and cross-pod broadcast for WebSocket services.

The core (``protocol``, ``connection``, ``hub``) is pure and never awaits the
network; ``broadcast`` links pods; ``handler`` adapts it all to aiohttp.
This package imports nothing from ``chat_api``.
"""

from __future__ import annotations

from .access import Admission, RoomCheck, admission
from .broadcast import (
    Broadcaster,
    Deliver,
    LinkState,
    MemoryBroadcaster,
    OrderedBroadcaster,
    RedisBroadcaster,
    RoomLog,
    Stamp,
)
from .connection import Connection, ConnectionState, FrameSink
from .exceptions import BroadcastError, ProtocolError, RealtimeError, StateError
from .handler import Handler, HandlerSettings, Identify, guest_identity
from .hub import LocalHub, RoomWatcher
from .presence import Member, MemoryPresence, Presence, PresenceBackend
from .protocol import Catchup, CloseCode, ErrorCode, Identity, Message
from .ratelimit import RateLimiter, Verdict
from .sequencer import Entry, RoomSequencer
from .timeline import Timeline, TimelineSettings

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
