"""LocalHub and Connection, driven by method calls: no sockets, no loop."""

from __future__ import annotations

import pytest

from realtime.core.connection import (
    QUEUED,
    Connection,
    ConnectionState,
    Outgoing,
    holding_writes,
)
from realtime.core.exceptions import StateError
from realtime.core.hub import LocalHub
from realtime.core.protocol import CloseCode, Identity
from realtime.rooms.timeline import Room, RoomState


def framed(payload: bytes) -> bytes:
    """What a transport that frames payloads would write (a stand-in)."""
    return b"F" + payload


class Sink:
    """A transport that records what it is given; ``stalled`` makes it stop
    draining."""

    def __init__(self) -> None:
        self.given: list[Outgoing] = []
        self.writes: list[int] = []
        """Frames per write call."""
        self.stalled = False
        self.closed_with: tuple[int, str] | None = None

    @property
    def frames(self) -> list[bytes]:
        return [out.encoded(framed) for out in self.given]

    def write(self, out: Outgoing) -> None:
        self.given.append(out)
        self.writes.append(1)

    def write_many(self, outs: list[Outgoing]) -> None:
        self.given += outs
        self.writes.append(len(outs))

    def buffered(self) -> int:
        return sum(len(o.payload) for o in self.given) if self.stalled else 0

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


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
    assert a.frames == b.frames == [framed(b'{"x":1}')]
    assert a.given[0] is b.given[0]  # one Outgoing for the broadcast
    assert a.frames[0] is b.frames[0]  # encoded once, the same bytes object
    assert c.frames == []
    assert hub.counters.deliveries == 2


def test_global_broadcast_reaches_everyone() -> None:
    hub = LocalHub()
    sinks = [make(hub, n, *rooms)[1] for n, rooms in [("a", ["r1"]), ("b", []), ("c", ["r2"])]]
    assert hub.broadcast(None, b"{}") == 3
    assert all(len(s.frames) == 1 for s in sinks)


def test_broadcast_to_unknown_room_is_a_no_op() -> None:
    assert LocalHub().broadcast("nobody", b"{}") == 0


def test_membership_changes_say_first_member_and_last_member() -> None:
    hub = LocalHub()
    a = Connection("a", Identity("a", "a"), Sink(), max_buffered=1000)
    b = Connection("b", Identity("b", "b"), Sink(), max_buffered=1000)
    hub.add(a)
    hub.add(b)
    assert hub.join(a, "r") is True  # the room's first member on this pod
    assert hub.join(b, "r", live=False) is False  # a waiting member counts too
    assert hub.join(a, "r") is False  # again: no change
    assert hub.leave(a, "r") is False  # b is still there
    assert hub.leave(a, "r") is False  # not a member any more
    assert hub.remove(b) == ["r"]  # the last member: the room is gone
    assert hub.room_sizes() == {}
    assert hub.remove(b) == []  # idempotent
    assert hub.connection_count == 1


def test_slow_member_is_closed_with_1013_others_keep_receiving() -> None:
    hub = LocalHub()
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
    assert hub.counters.slow_client_disconnects == 1  # counted once, not per broadcast
    # It stays a member, delivered nothing, until its transport reports it
    # gone: a broadcast never changes membership.
    assert hub.room_sizes() == {"r": 2}
    assert hub.remove(slow) == []
    assert hub.room_sizes() == {"r": 1}


def test_close_all_closes_open_connections_once() -> None:
    hub = LocalHub()
    _, a = make(hub, "a", "r")
    _, b = make(hub, "b")
    assert hub.close_all(CloseCode.GOING_AWAY, "bye") == 2
    assert a.closed_with == b.closed_with == (1001, "bye")
    assert hub.close_all(CloseCode.GOING_AWAY, "bye") == 0


def test_a_closed_connection_takes_nothing_and_closes_no_more() -> None:
    sink = Sink()
    conn = Connection("a", Identity("a", "a"), sink, max_buffered=10)
    conn.close(CloseCode.GOING_AWAY, "bye")
    conn.close(CloseCode.NORMAL, "again")  # closing already: no second close
    assert sink.closed_with == (1001, "bye")
    conn.closed()
    conn.closed()  # idempotent
    assert conn.state is ConnectionState.CLOSED
    assert conn.deliver(Outgoing(b"{}")) != QUEUED
    conn.close(CloseCode.NORMAL, "after")
    assert sink.closed_with == (1001, "bye")
    assert sink.given == []


def test_the_room_state_machine_refuses_illegal_moves() -> None:
    room = Room("r", keep=10)
    with pytest.raises(StateError):
        room.move(RoomState.LIVE)  # not before it was read
    room.move(RoomState.CLOSED)
    with pytest.raises(StateError):
        room.move(RoomState.READING)


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


def test_frames_delivered_while_writes_are_held_go_in_one_write_per_member() -> None:
    hub = LocalHub()
    a, sink_a = make(hub, "a", "r1")
    _, sink_b = make(hub, "b", "r1")
    with holding_writes:
        hub.broadcast("r1", b'{"x":1}')
        with holding_writes:  # nested: written when the outer one is left
            hub.broadcast("r1", b'{"x":2}')
            hub.send_to(a, b'{"ack":1}')
        assert sink_a.given == []
        assert sink_b.given == []
    assert [o.payload for o in sink_a.given] == [b'{"x":1}', b'{"x":2}', b'{"ack":1}']
    assert sink_a.writes == [3]
    assert [o.payload for o in sink_b.given] == [b'{"x":1}', b'{"x":2}']
    assert sink_b.writes == [2]
    hub.broadcast("r1", b'{"x":3}')  # not held: written at once
    assert sink_a.writes == [3, 1]
    assert sink_b.writes == [2, 1]
    assert holding_writes.connections is None


def test_held_frames_go_ahead_of_a_close_and_none_after_it() -> None:
    hub = LocalHub()
    a, sink = make(hub, "a", "r1")
    with holding_writes:
        hub.broadcast("r1", b'{"x":1}')
        a.close(CloseCode.TRY_AGAIN_LATER, "going")
        assert [o.payload for o in sink.given] == [b'{"x":1}']  # before the Close
        assert hub.broadcast("r1", b'{"x":2}') == 0
    assert [o.payload for o in sink.given] == [b'{"x":1}']
    assert sink.closed_with == (CloseCode.TRY_AGAIN_LATER, "going")


def test_writes_held_are_released_when_the_block_raises() -> None:
    hub = LocalHub()
    _, sink = make(hub, "a", "r1")

    def deliver_then_fail() -> None:
        with holding_writes:
            hub.broadcast("r1", b'{"x":1}')
            raise RuntimeError("a bug above")

    with pytest.raises(RuntimeError):
        deliver_then_fail()
    assert [o.payload for o in sink.given] == [b'{"x":1}']
    assert holding_writes.connections is None
    assert holding_writes.depth == 0


def test_a_socket_that_fails_its_write_keeps_no_other_members_frames() -> None:
    """Released in order, a write that raises (a socket gone under the
    transport) still lets every other member's held frames out, and the
    error is raised after; nothing stays held."""
    hub = LocalHub()
    a, broken = make(hub, "a", "r1")
    b, sink = make(hub, "b", "r1")

    def fail(outs: list[Outgoing]) -> None:
        raise RuntimeError("the handler is closed")

    broken.write_many = fail  # type: ignore[method-assign]

    def two_broadcasts() -> None:
        with holding_writes:
            hub.broadcast("r1", b'{"x":1}')
            hub.broadcast("r1", b'{"x":2}')

    with pytest.raises(RuntimeError, match="handler is closed"):
        two_broadcasts()
    assert [o.payload for o in sink.given] == [b'{"x":1}', b'{"x":2}']
    assert (a.held, b.held, holding_writes.connections) == (None, None, None)
    hub.broadcast("r1", b'{"x":3}')  # not held any more: written at once
    assert sink.writes == [2, 1]
    assert [o.payload for o in broken.given] == [b'{"x":3}']
