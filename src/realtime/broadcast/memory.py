"""The local-only broadcaster: one pod, no Redis."""

from __future__ import annotations

from collections.abc import Mapping

from ..exceptions import StateError
from ..protocol import Message
from .base import Deliver, LinkState

__all__ = ["MemoryBroadcaster"]


class MemoryBroadcaster:
    """Delivers every message to this pod's members and nowhere else."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._state = LinkState.LOCAL_ONLY
        self._published = 0
        self._rooms: set[str] = set()

    @property
    def state(self) -> LinkState:
        return self._state

    async def start(self, deliver: Deliver) -> None:
        if self._deliver is not None:
            raise StateError("broadcaster already started")
        self._deliver = deliver

    async def stop(self) -> None:
        self._state = LinkState.STOPPED
        self._deliver = None

    def publish(self, message: Message) -> None:
        if self._deliver is None:
            raise StateError("broadcaster is not running")
        self._published += 1
        self._deliver(message.room, message.encode())

    def subscribe(self, room: str) -> None:
        self._rooms.add(room)

    def unsubscribe(self, room: str) -> None:
        self._rooms.discard(room)

    def stats(self) -> Mapping[str, object]:
        return {
            "kind": "memory",
            "state": self._state.value,
            "published": self._published,
            "subscribed_rooms": len(self._rooms),
        }
