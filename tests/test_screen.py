"""The publish ``Screen`` seam of ``realtime``, in-process: a real node
(local-only) and sessions on a recording transport, with screens written
here — what the HTTP publish hook builds on, without HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from realtime import (
    ACCEPT,
    Admission,
    Decision,
    Identity,
    Node,
    NodeSettings,
    Reject,
    Replace,
    Session,
    Submission,
)

from .test_session import frame, open_session


class Filter:
    """Rejects ``"spam"``, upper-cases strings, remembers what it saw; with
    ``gate`` set it waits for it first."""

    def __init__(self) -> None:
        self.seen: list[Submission] = []
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()

    async def __call__(self, message: Submission) -> Decision:
        self.seen.append(message)
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if message.data == "spam":
            return Reject("blocked_word", "no spam")
        if message.data == "boom":
            raise RuntimeError("a bug in the screen")
        if isinstance(message.data, str):
            return Replace(message.data.upper())
        return ACCEPT


@pytest.fixture
def screen() -> Filter:
    return Filter()


@pytest.fixture
async def node(screen: Filter) -> AsyncIterator[Node]:
    node = Node(NodeSettings(pod_id="pod-s"), screen=screen)
    async with asyncio.timeout(5), node.running():
        yield node


async def send(session: Session, **fields: Any) -> None:
    pending = session.receive(frame(type="message", **fields))
    assert pending is not None, "a screened message is answered once it was screened"
    await asyncio.wait_for(pending, 5)


async def test_accept_replace_and_reject(node: Node, screen: Filter) -> None:
    session, wire = await open_session(node, "r")
    wire.take()
    await send(session, data={"n": 1}, ref=1)
    await send(session, data="hi", ref=2)
    await send(session, data="spam", ref=3)
    frames = wire.take()
    assert [(f["type"], f.get("data"), f.get("ref")) for f in frames] == [
        ("message", {"n": 1}, None),
        ("ack", None, 1),
        ("message", "HI", None),
        ("ack", None, 2),
        ("error", None, 3),
    ]
    assert frames[-1] == {"type": "error", "code": "blocked_word", "message": "no spam", "ref": 3}
    assert node.counters.errors == {"rejected": 1}  # the app's codes are not metric labels
    stored = await node.backend.read("r", 0, 10)
    assert [e.offset for e in stored.entries] == [1, 2]
    seen = screen.seen[1]
    assert (seen.room, seen.sender, seen.data, seen.key) == (
        "r",
        Identity("ann", "Ann"),
        "hi",
        None,
    )


async def test_a_resend_of_replaced_data_is_a_duplicate_and_other_data_a_conflict(
    node: Node,
) -> None:
    session, wire = await open_session(node, "r")
    wire.take()
    await send(session, data="hi", key="k", ref=1)
    await send(session, data="hi", key="k", ref=2)
    await send(session, data="HI", key="k", ref=3)  # what was stored, but not what was sent
    message, first, again, conflict = wire.take()
    assert message["data"] == "HI"
    assert (again["duplicate"], again["offset"], again["id"]) == (
        True,
        first["offset"],
        first["id"],
    )
    assert (conflict["code"], conflict["ref"]) == ("key_conflict", 3)


async def test_the_next_frame_waits_for_the_screen(node: Node, screen: Filter) -> None:
    session, wire = await open_session(node, "r")
    wire.take()
    screen.gate = asyncio.Event()
    pending = session.receive(frame(type="message", data="one", ref=1))
    assert pending is not None
    task = asyncio.ensure_future(pending)
    await asyncio.wait_for(screen.called.wait(), 5)
    assert wire.take() == []  # nothing sent while the screen decides
    screen.gate.set()
    await asyncio.wait_for(task, 5)
    assert [f["type"] for f in wire.take()] == ["message", "ack"]


async def test_a_failing_screen_costs_the_message_not_the_connection(node: Node) -> None:
    session, wire = await open_session(node, "r")
    wire.take()
    await send(session, data="boom", ref=1)
    (error,) = wire.take()
    assert (error["code"], error["ref"]) == ("unavailable", 1)
    await send(session, data="fine", ref=2)
    assert [f["type"] for f in wire.take()] == ["message", "ack"]
    assert wire.closed is None


async def test_a_trusted_admission_skips_the_screen_and_welcome_data_is_shown(
    node: Node, screen: Filter
) -> None:
    granted = Admission(Identity("bot", "Bot"), trusted=True, data={"plan": "pro"})
    session, wire = await open_session(node, "r", user="bot", admission=granted)
    (welcome,) = wire.take()
    assert welcome["data"] == {"plan": "pro"}
    assert session.receive(frame(type="message", data="spam", ref=1)) is None
    assert [f["type"] for f in wire.take()] == ["message", "ack"]
    assert screen.seen == []
