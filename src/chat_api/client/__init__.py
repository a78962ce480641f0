"""The Python asyncio client of chat-api: connects with a token, joins rooms
with history, sends with an idempotency key, and reconnects and resumes by
itself (docs/client.md)::

    async with Client("ws://127.0.0.1:8000/api/chat-api/ws/general") as client:
        await client.send("general", {"text": "hi"})
        async for event in client:
            if isinstance(event, Message):
                print(event.sender.name, event.data)

``chat-api chat URL`` is the terminal client built on it (``cli.py``).
"""

from __future__ import annotations

from .client import Client, TokenSource
from .errors import ClientClosed, ClientError, ConnectError, JoinError, Refused, SendError
from .events import (
    Ack,
    Closed,
    Disconnected,
    EpochChanged,
    Event,
    Joined,
    Left,
    MemberJoined,
    MemberLeft,
    Message,
    Presence,
    PresenceMember,
    Reconnected,
    ServerError,
    Unrecoverable,
    User,
)

__all__ = [
    "Ack",
    "Client",
    "ClientClosed",
    "ClientError",
    "Closed",
    "ConnectError",
    "Disconnected",
    "EpochChanged",
    "Event",
    "JoinError",
    "Joined",
    "Left",
    "MemberJoined",
    "MemberLeft",
    "Message",
    "Presence",
    "PresenceMember",
    "Reconnected",
    "Refused",
    "SendError",
    "ServerError",
    "TokenSource",
    "Unrecoverable",
    "User",
]
