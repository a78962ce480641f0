"""realtime: rooms, fan-out and cross-pod broadcast for WebSocket services.

The core (``protocol``, ``connection``, ``hub``) is pure and never awaits the
network; ``broadcast`` links pods; ``handler`` adapts it all to aiohttp.
This package imports nothing from ``chat_api``.
"""

from __future__ import annotations

from .access import Admission, RoomCheck, admission
from .broadcast import Broadcaster, Deliver, LinkState, MemoryBroadcaster, RedisBroadcaster
from .connection import Connection, ConnectionState, FrameSink
from .exceptions import BroadcastError, ProtocolError, RealtimeError, StateError
from .handler import Handler, HandlerSettings, Identify, guest_identity
from .hub import LocalHub, RoomWatcher
from .protocol import CloseCode, ErrorCode, Identity, Message
from .ratelimit import RateLimiter, Verdict

__all__ = [
    "Admission",
    "BroadcastError",
    "Broadcaster",
    "CloseCode",
    "Connection",
    "ConnectionState",
    "Deliver",
    "ErrorCode",
    "FrameSink",
    "Handler",
    "HandlerSettings",
    "Identify",
    "Identity",
    "LinkState",
    "LocalHub",
    "MemoryBroadcaster",
    "Message",
    "ProtocolError",
    "RateLimiter",
    "RealtimeError",
    "RedisBroadcaster",
    "RoomCheck",
    "RoomWatcher",
    "StateError",
    "Verdict",
    "admission",
    "guest_identity",
]
