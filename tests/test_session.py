"""Whole conversations with a ``Session``, in-process: no socket, no web
framework. A recording transport stands for the WebSocket; the node is real
(local-only backend), so a frame in gives exactly the frames out a client
would read, and the close a client would get."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from realtime import Admission, Identity, Limits, Node, NodeSettings, Outgoing, Session
from realtime.core.access import read_handshake
from realtime.core.protocol import NO_CATCHUP


class Wire:
    """What the client would read: every frame's JSON, and the close."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None

    def write(self, out: Outgoing) -> None:
        self.frames.append(orjson.loads(out.payload))

    def write_many(self, outs: list[Outgoing]) -> None:
        for out in outs:
            self.write(out)

    def buffered(self) -> int:
        return 0

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def take(self) -> list[dict[str, Any]]:
        frames, self.frames = self.frames, []
        return frames


@pytest.fixture
async def node(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    """A local-only node; ``@pytest.mark.parametrize("node", [Limits(...)],
    indirect=True)`` gives it other limits."""
    limits = getattr(request, "param", Limits(max_rooms=2))
    node = Node(NodeSettings(pod_id="pod-a", limits=limits))
    async with asyncio.timeout(5), node.running():
        yield node


async def open_session(
    node: Node, room: str | None = "lobby", *, user: str = "ann", admission: Admission | None = None
) -> tuple[Session, Wire]:
    wire = Wire()
    handshake = read_handshake(f"c-{user}", room, {}, {})
    granted = admission or Admission(Identity(user, user.title()))
    session = Session.open(node, wire, handshake, granted)
    await asyncio.wait_for(session.start(room, NO_CATCHUP), 5)
    return session, wire


def frame(**fields: Any) -> bytes:
    return orjson.dumps(fields)


async def test_welcome_then_a_message_comes_back_stamped_and_acked(node: Node) -> None:
    session, wire = await open_session(node)
    (welcome,) = wire.take()
    assert welcome["type"] == "welcome"
    assert (welcome["pod"], welcome["room"], welcome["rooms"]) == ("pod-a", "lobby", ["lobby"])
    assert welcome["user"] == {"id": "ann", "name": "Ann"}
    assert session.receive(frame(type="message", data={"text": "hi"}, ref=7)) is None
    message, ack = wire.take()
    assert (message["type"], message["offset"], message["data"]) == ("message", 1, {"text": "hi"})
    assert message["from"] == {"id": "ann", "name": "Ann"}  # set by the server
    assert ack == {
        "type": "ack",
        "ref": 7,
        "id": message["id"],
        "room": "lobby",
        "offset": 1,
        "epoch": message["epoch"],
    }


async def test_two_members_see_one_order(node: Node) -> None:
    ann, ann_wire = await open_session(node, user="ann")
    bob, bob_wire = await open_session(node, user="bob")
    ann_wire.take()
    bob_wire.take()
    ann.receive(frame(type="message", data=1))
    bob.receive(frame(type="message", data=2))
    for wire in (ann_wire, bob_wire):
        got = [(f["offset"], f["data"]) for f in wire.take() if f["type"] == "message"]
        assert got == [(1, 1), (2, 2)]


async def test_join_send_leave_and_the_room_cap(node: Node) -> None:
    session, wire = await open_session(node)
    wire.take()
    pending = session.receive(frame(type="join", room="den", ref="j"))
    assert pending is not None
    await asyncio.wait_for(pending, 5)
    assert wire.take() == [{"type": "joined", "room": "den", "ref": "j"}]
    session.receive(frame(type="join", room="attic", ref="k"))
    assert wire.take()[0]["code"] == "too_many_rooms"
    session.receive(frame(type="message", room="den", data="x"))
    assert [f["room"] for f in wire.take()] == ["den"]
    session.receive(frame(type="leave", room="den", ref=3))
    assert wire.take() == [{"type": "left", "room": "den", "ref": 3}]
    session.receive(frame(type="message", room="den", data="x", ref=4))
    (error,) = wire.take()
    assert (error["type"], error["code"], error["ref"]) == ("error", "not_in_room", 4)


async def test_bad_frames_are_answered_and_the_session_goes_on(node: Node) -> None:
    session, wire = await open_session(node)
    wire.take()
    session.receive(b"{not json")
    session.receive(frame(type="shout", ref=1))
    session.receive(frame(type="message", ref=2))
    session.receive(frame(type="join", room="bad room!", ref=3))
    codes = [(f["code"], f.get("ref")) for f in wire.take()]
    assert codes == [
        ("invalid_json", None),
        ("unknown_type", 1),
        ("missing_data", 2),
        ("invalid_room", 3),
    ]
    session.receive(frame(type="ping", ref=5))
    assert wire.take() == [{"type": "pong", "ref": 5}]
    assert wire.closed is None
    assert node.stats()["errors_sent"] == 4


async def test_a_room_the_admission_forbids_is_refused(node: Node) -> None:
    granted = Admission(Identity("ann", "Ann"), may_join=lambda room: room == "lobby")
    session, wire = await open_session(node, admission=granted)
    wire.take()
    session.receive(frame(type="join", room="den", ref=1))
    (error,) = wire.take()
    assert (error["code"], error["ref"]) == ("forbidden_room", 1)


@pytest.mark.parametrize(
    "node", [Limits(rate_per_second=10, rate_burst=3, rate_max_refused=2)], indirect=True
)
async def test_over_the_rate_a_frame_is_refused_and_a_flood_is_closed(node: Node) -> None:
    session, wire = await open_session(node)
    wire.take()
    for n in range(3):  # the burst
        session.receive(frame(type="ping", ref=n))
    session.receive(frame(type="ping", ref="over"))
    frames = wire.take()
    assert [f["type"] for f in frames] == ["pong", "pong", "pong", "error"]
    assert (frames[-1]["code"], frames[-1]["ref"]) == ("rate_limited", "over")
    for _ in range(3):  # the flood goes on: more than max_refused refusals
        session.receive(frame(type="ping"))
    assert wire.closed == (1008, "rate limit exceeded")
    session.receive(frame(type="ping", ref="late"))  # closing: nothing more
    assert [f.get("code") for f in wire.take()] == ["rate_limited"]  # then the close
    assert node.stats()["policy_closes"]["rate_limit"] == 1


async def test_a_binary_frame_closes_with_1003(node: Node) -> None:
    session, wire = await open_session(node)
    session.receive_binary()
    assert wire.closed is not None
    assert wire.closed[0] == 1003


async def test_the_global_channel_reaches_every_connection(node: Node) -> None:
    sender, sender_wire = await open_session(node, None, user="ann")
    _, member_wire = await open_session(node, "lobby", user="bob")
    sender_wire.take()
    member_wire.take()
    sender.receive(frame(type="message", data="all", ref=1))
    assert [f["type"] for f in sender_wire.take()] == ["message", "ack"]
    (message,) = member_wire.take()
    assert (message["room"], message["data"]) == (None, "all")
    assert "offset" not in message  # global messages are best effort


async def test_a_presence_query_lists_the_room(node: Node) -> None:
    ann, ann_wire = await open_session(node, user="ann")
    ann_wire.take()
    await node.presence.flush()
    ann_wire.take()  # member_joined
    pending = ann.receive(frame(type="presence", room="lobby", ref="p"))
    assert pending is not None
    await asyncio.wait_for(pending, 5)
    (presence,) = ann_wire.take()
    assert (presence["type"], presence["ref"]) == ("presence", "p")
    assert [m["id"] for m in presence["members"]] == ["ann"]


async def test_a_closed_session_leaves_its_rooms(node: Node) -> None:
    session, _ = await open_session(node)
    assert node.stats()["rooms"] == {"lobby": 1}
    session.closed()
    session.closed()  # idempotent
    assert node.stats()["rooms"] == {}
    assert node.stats()["connections"]["open"] == 0
