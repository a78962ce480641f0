"""The contract between a pod and the transport that links pods.

A broadcaster takes every message sent on this pod (``publish``), delivers
it to this pod's members through the ``Deliver`` callback it was started
with, and carries it to the other pods, which deliver it to theirs. The hub
tells it which rooms have local members (``subscribe``/``unsubscribe``) so it
only listens for rooms this pod hosts. Neither the hub nor the handler knows
which implementation is in use.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from ..protocol import Message

__all__ = ["Broadcaster", "Deliver", "LinkState"]

Deliver = Callable[[str | None, bytes], int]
"""Hand a client-ready JSON payload to local members of a room (None: all)."""


class LinkState(enum.StrEnum):
    """State of the link to other pods, as shown in stats and ``/readyz``."""

    LOCAL_ONLY = "local-only"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


@runtime_checkable
class Broadcaster(Protocol):
    """Cross-pod fan-out. Implementations: ``MemoryBroadcaster``, ``RedisBroadcaster``."""

    @property
    def state(self) -> LinkState:
        """Where the link to other pods stands."""

    async def start(self, deliver: Deliver) -> None:
        """Begin delivering; returns once started, even if the link is down."""

    async def stop(self) -> None:
        """Unsubscribe, close every connection and task; idempotent."""

    def publish(self, message: Message) -> None:
        """Deliver ``message`` locally and to every other pod. Never raises
        for link trouble and never blocks: failures are counted in stats."""

    def subscribe(self, room: str) -> None:
        """This pod now has members in ``room``: receive its messages."""

    def unsubscribe(self, room: str) -> None:
        """This pod has no members in ``room`` any more."""

    def stats(self) -> Mapping[str, object]:
        """Counters and state for ``/ws/stats`` (no secrets)."""
