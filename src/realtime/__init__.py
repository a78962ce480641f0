"""realtime: rooms, fan-out and cross-pod delivery for WebSocket services.

Importing this package imports nothing else: each name below is loaded from
its module on first use, so the pure core (``realtime.core``) can be used and
tested without a web framework or a Redis client installed, and the aiohttp
and Redis parts load only where they are used.

The parts (see ``docs/architecture.md``): ``Node`` is the wiring root of a
pod; ``Session`` is what one connection may do; transports adapt a web
server (``AiohttpTransport``, ``AsgiTransport``); backends link the pods
(``MemoryBackend``, ``RedisBackend``, chosen by URL with ``open_backend``);
the application's hooks are ``Identify`` (who connects) and ``Screen``
(what a client's message becomes).
This package imports nothing from ``chat_api``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends import (
        Backend,
        BackendHandler,
        LinkState,
        Member,
        MemoryBackend,
        PresenceStore,
        RedisOptions,
        Slice,
        Stamp,
        Unstored,
        open_backend,
    )
    from .backends.redis.backend import RedisBackend
    from .core.access import (
        Admission,
        Handshake,
        Identify,
        Reauthorize,
        RoomCheck,
        guest_identity,
    )
    from .core.connection import Connection, ConnectionState, Outgoing, Transport
    from .core.exceptions import BroadcastError, ProtocolError, RealtimeError, Refused, StateError
    from .core.hub import LocalHub
    from .core.protocol import Catchup, CloseCode, ErrorCode, Identity, Message
    from .core.ratelimit import RateLimiter, Verdict
    from .core.screen import ACCEPT, Decision, Reject, Replace, Screen, Submission
    from .core.sequencer import Entry, RoomSequencer
    from .node import Limits, Node, NodeSettings
    from .rooms.presence import Presence
    from .rooms.timeline import Timeline, TimelineSettings
    from .session import Session
    from .transports.aiohttp import AiohttpTransport
    from .transports.asgi import AsgiTransport

_EXPORTS: dict[str, str] = {
    "Admission": "core.access",
    "Handshake": "core.access",
    "Identify": "core.access",
    "Reauthorize": "core.access",
    "RoomCheck": "core.access",
    "guest_identity": "core.access",
    "Connection": "core.connection",
    "ConnectionState": "core.connection",
    "Outgoing": "core.connection",
    "Transport": "core.connection",
    "BroadcastError": "core.exceptions",
    "ProtocolError": "core.exceptions",
    "RealtimeError": "core.exceptions",
    "Refused": "core.exceptions",
    "StateError": "core.exceptions",
    "LocalHub": "core.hub",
    "Catchup": "core.protocol",
    "CloseCode": "core.protocol",
    "ErrorCode": "core.protocol",
    "Identity": "core.protocol",
    "Message": "core.protocol",
    "RateLimiter": "core.ratelimit",
    "Verdict": "core.ratelimit",
    "ACCEPT": "core.screen",
    "Decision": "core.screen",
    "Reject": "core.screen",
    "Replace": "core.screen",
    "Screen": "core.screen",
    "Submission": "core.screen",
    "Entry": "core.sequencer",
    "RoomSequencer": "core.sequencer",
    "Backend": "backends",
    "BackendHandler": "backends",
    "LinkState": "backends",
    "Member": "backends",
    "MemoryBackend": "backends",
    "PresenceStore": "backends",
    "RedisOptions": "backends",
    "Slice": "backends",
    "Stamp": "backends",
    "Unstored": "backends",
    "open_backend": "backends",
    "RedisBackend": "backends.redis.backend",
    "Limits": "node",
    "Node": "node",
    "NodeSettings": "node",
    "Presence": "rooms.presence",
    "Timeline": "rooms.timeline",
    "TimelineSettings": "rooms.timeline",
    "Session": "session",
    "AiohttpTransport": "transports.aiohttp",
    "AsgiTransport": "transports.asgi",
}

__all__ = [
    "ACCEPT",
    "Admission",
    "AiohttpTransport",
    "AsgiTransport",
    "Backend",
    "BackendHandler",
    "BroadcastError",
    "Catchup",
    "CloseCode",
    "Connection",
    "ConnectionState",
    "Decision",
    "Entry",
    "ErrorCode",
    "Handshake",
    "Identify",
    "Identity",
    "Limits",
    "LinkState",
    "LocalHub",
    "Member",
    "MemoryBackend",
    "Message",
    "Node",
    "NodeSettings",
    "Outgoing",
    "Presence",
    "PresenceStore",
    "ProtocolError",
    "RateLimiter",
    "RealtimeError",
    "Reauthorize",
    "RedisBackend",
    "RedisOptions",
    "Refused",
    "Reject",
    "Replace",
    "RoomCheck",
    "RoomSequencer",
    "Screen",
    "Session",
    "Slice",
    "Stamp",
    "StateError",
    "Submission",
    "Timeline",
    "TimelineSettings",
    "Transport",
    "Unstored",
    "Verdict",
    "guest_identity",
    "open_backend",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'realtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
