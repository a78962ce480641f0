"""Presence's local tracking, driven by method calls: one pod, the memory
backend, ``flush()`` called directly (no background tasks)."""

from __future__ import annotations

from realtime import Presence
from realtime.backends import MemoryPresence
from realtime.core.connection import Connection
from realtime.core.hub import LocalHub
from realtime.core.protocol import Identity

from .test_hub import Sink


def connection(hub: LocalHub, conn_id: str, user: str, *rooms: str) -> Connection:
    conn = Connection(conn_id, Identity(user, user.title()), Sink(), max_buffered=1000)
    hub.add(conn)
    for room in rooms:
        hub.join(conn, room)
    return conn


async def present(presence: Presence, room: str) -> list[str]:
    await presence.flush()
    return [m.id for m in await presence.members(room)]


async def test_a_user_with_two_connections_is_present_until_the_last_goes() -> None:
    hub = LocalHub()
    presence = Presence(hub, MemoryPresence(), deliver=hub.broadcast)
    a = connection(hub, "c1", "ann", "lobby", "den")
    b = connection(hub, "c2", "ann", "lobby")
    for conn in (a, b):
        presence.join(conn, "lobby")
    presence.join(a, "lobby")  # twice: still one connection of one user
    presence.join(a, "den")
    assert await present(presence, "lobby") == ["ann"]
    presence.leave(a, "lobby")
    assert await present(presence, "lobby") == ["ann"]  # b is still there
    presence.drop(b)
    assert await present(presence, "lobby") == []
    assert await present(presence, "den") == ["ann"]  # a left the lobby only
    presence.drop(a)
    assert await present(presence, "den") == []
    assert presence.stats()["members"] == 0


async def test_a_connection_the_hub_already_removed_is_still_dropped() -> None:
    # The node removes a connection from the hub (and its rooms) when its
    # socket is gone, and drops it from presence too, in either order.
    hub = LocalHub()
    presence = Presence(hub, MemoryPresence(), deliver=hub.broadcast)
    conn = connection(hub, "c1", "bob", "lobby")
    presence.join(conn, "lobby")
    assert await present(presence, "lobby") == ["bob"]
    hub.remove(conn)
    assert conn.rooms == ()
    presence.drop(conn)
    assert await present(presence, "lobby") == []


async def test_leaving_a_room_never_joined_changes_nothing() -> None:
    hub = LocalHub()
    presence = Presence(hub, MemoryPresence(), deliver=hub.broadcast)
    conn = connection(hub, "c1", "cy", "lobby")
    presence.join(conn, "lobby")
    presence.leave(conn, "den")
    presence.drop(connection(hub, "c2", "dee"))
    assert await present(presence, "lobby") == ["cy"]
