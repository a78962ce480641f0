"""LocalHub and Connection, driven by method calls: no sockets, no loop."""

from __future__ import annotations

import pytest

from realtime.core.connection import Connection, ConnectionState
from realtime.core.exceptions import StateError
from realtime.core.hub import LocalHub
from realtime.core.protocol import CloseCode, Identity, text_frame


class Sink:
    """A transport that records frames; ``stalled`` makes it stop draining."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.stalled = False
        self.closed_with: tuple[int, str] | None = None

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)

    def buffered(self) -> int:
        return sum(map(len, self.frames)) if self.stalled else 0

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


class Watcher:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def subscribe(self, room: str) -> None:
        self.events.append(("sub", room))

    def unsubscribe(self, room: str) -> None:
        self.events.append(("unsub", room))


def make(hub: LocalHub, name: str, *rooms: str, limit: int = 1000) -> tuple[Connection, Sink]:
    sink = Sink()
    conn = Connection(name, Identity(name, name), sink, max_buffered=limit)
    hub.add(conn)
    for room in rooms:
        hub.join(conn, room)
    return conn, sink


def test_room_broadcast_reaches_members_only_with_one_shared_frame() -> None:
    hub = LocalHub()
    _, a = make(hub, "a", "r1")
    _, b = make(hub, "b", "r1")
    _, c = make(hub, "c", "r2")
    assert hub.broadcast("r1", b'{"x":1}') == 2
    assert a.frames == b.frames == [text_frame(b'{"x":1}')]
    assert a.frames[0] is b.frames[0]  # framed once, same bytes object
    assert c.frames == []
    assert hub.counters.deliveries == 2


def test_global_broadcast_reaches_everyone() -> None:
    hub = LocalHub()
    sinks = [make(hub, n, *rooms)[1] for n, rooms in [("a", ["r1"]), ("b", []), ("c", ["r2"])]]
    assert hub.broadcast(None, b"{}") == 3
    assert all(len(s.frames) == 1 for s in sinks)


def test_broadcast_to_unknown_room_is_a_no_op() -> None:
    assert LocalHub().broadcast("nobody", b"{}") == 0


def test_watcher_sees_first_join_and_last_leave_only() -> None:
    watcher = Watcher()
    hub = LocalHub(watcher)
    a, _ = make(hub, "a", "r")
    b, _ = make(hub, "b", "r")
    hub.leave(a, "r")
    assert watcher.events == [("sub", "r")]
    hub.remove(b)
    assert watcher.events == [("sub", "r"), ("unsub", "r")]
    assert hub.room_sizes() == {}
    hub.remove(b)  # idempotent
    assert hub.connection_count == 1


def test_slow_member_is_closed_with_1013_and_removed_others_keep_receiving() -> None:
    watcher = Watcher()
    hub = LocalHub(watcher)
    slow, slow_sink = make(hub, "slow", "r", limit=100)
    _, fast_sink = make(hub, "fast", "r")
    slow_sink.stalled = True
    for _ in range(10):
        hub.broadcast("r", b"x" * 40)
    assert slow.state is ConnectionState.CLOSING
    assert slow_sink.closed_with is not None
    assert slow_sink.closed_with[0] == CloseCode.TRY_AGAIN_LATER
    assert len(slow_sink.frames) == 3  # stopped at the limit
    assert len(fast_sink.frames) == 10
    assert hub.counters.slow_client_disconnects == 1
    assert hub.room_sizes() == {"r": 1}
    assert slow.rooms == ()


def test_close_all_closes_open_connections_once() -> None:
    hub = LocalHub()
    _, a = make(hub, "a", "r")
    _, b = make(hub, "b")
    assert hub.close_all(CloseCode.GOING_AWAY, "bye") == 2
    assert a.closed_with == b.closed_with == (1001, "bye")
    assert hub.close_all(CloseCode.GOING_AWAY, "bye") == 0


def test_connection_state_machine_refuses_illegal_moves() -> None:
    conn = Connection("a", Identity("a", "a"), Sink(), max_buffered=10)
    conn.closed()
    assert conn.state is ConnectionState.CLOSED
    assert not conn.send(b"{}")
    with pytest.raises(StateError):
        conn._move(ConnectionState.OPEN)


def test_a_connections_rooms_follow_joins_and_leaves() -> None:
    hub = LocalHub()
    conn, _ = make(hub, "a", "r1", "r2")
    hub.join(conn, "r1")  # again: no duplicate
    assert conn.rooms == ("r1", "r2")
    hub.leave(conn, "r1")
    hub.leave(conn, "r3")  # not a member: nothing changes
    assert conn.rooms == ("r2",)
    assert hub.room_sizes() == {"r2": 1}
    hub.remove(conn)
    assert conn.rooms == ()
    assert hub.room_sizes() == {}
