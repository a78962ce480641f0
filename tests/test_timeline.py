"""Room order and catch-up in-process, through the node: gap hold and repair
from history, catch-up at join, a lost script reply — without sockets (the
backend is real, a connection's transport a list)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from realtime import (
    Catchup,
    Connection,
    Identity,
    MemoryBackend,
    Message,
    Node,
    NodeSettings,
    Outgoing,
    Presence,
    Stamp,
    Unstored,
)
from realtime.backends import MemoryPresence
from realtime.backends.redis.scripts import APPEND, READ
from realtime.core.access import Admission, read_handshake
from realtime.core.exceptions import BroadcastError
from realtime.core.sequencer import Entry

from .redis_support import RedisServer, ReplyCutter, quick_broadcaster
from .support import eventually


class Frames:
    """A connection's transport that keeps the JSON of every frame."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def write(self, out: Outgoing) -> None:
        self.frames.append(orjson.loads(out.payload))

    def write_many(self, outs: list[Outgoing]) -> None:
        for out in outs:
            self.write(out)

    def buffered(self) -> int:
        return 0

    def close(self, code: int, reason: str) -> None:
        pass

    def offsets(self) -> list[int]:
        return [f["offset"] for f in self.frames if f["type"] == "message"]


class Lossy(Node):
    """A node that never sees the room entries whose offsets are in ``drop``
    (as if pub/sub lost them on the way)."""

    drop: set[int] = set()

    def on_entry(self, room: str, entry: Entry) -> None:
        if entry.offset not in self.drop:
            super().on_entry(room, entry)


def settings(**kwargs: Any) -> NodeSettings:
    return NodeSettings(pod_id="pod-a", gap_wait=0.05, **kwargs)


@pytest.fixture
async def node() -> AsyncIterator[Lossy]:
    node = Lossy(settings(history_length=50))
    async with asyncio.timeout(5), node.running():
        yield node


def member(node: Node, n: int) -> tuple[Connection, Frames]:
    sink = Frames()
    handshake = read_handshake(f"c{n}", None, {}, {})
    conn = node.connect(sink, handshake, Admission(Identity(f"u{n}", f"user{n}")))
    return conn, sink


async def join(node: Node, conn: Connection, catchup: Catchup | None = None) -> None:
    await asyncio.wait_for(node.join(conn, "r", catchup or Catchup(), lambda: None), 5)


def publish(node: Node, n: int, key: str | None = None) -> asyncio.Future[Stamp | Unstored]:
    done: asyncio.Future[Stamp | Unstored] = asyncio.get_running_loop().create_future()
    msg = Message(id=f"m{n}", room="r", sender=Identity("u", "u"), ts=0, data=n)
    node.publish(msg, done.set_result, key=key)
    return done


PATHS = {
    # what marks the append's command, and the key that sends it that way: a
    # keyed append goes through the script; an unkeyed one to a room whose
    # last append on this connection did is a plain XADD
    "script": (APPEND.sha.encode(), "k2"),
    "plain": (b"NOMKSTREAM", None),
}


async def test_a_lost_entry_is_held_for_then_read_from_history(
    node: Lossy,
) -> None:
    conn, sink = member(node, 1)
    await join(node, conn)
    node.drop = {2, 3}
    for n in range(1, 6):
        await publish(node, n)
    # 4 and 5 arrived, 2 and 3 did not: nothing after 1 is delivered yet.
    assert sink.offsets() == [1]
    assert node.timeline.stats()["rooms_holding"] == 1

    async def repaired() -> bool:
        return sink.offsets() == [1, 2, 3, 4, 5]

    await eventually(repaired, timeout=5)
    stats = node.timeline.stats()
    assert (stats["gap_repairs"], stats["recovered"], stats["lost"]) == (1, 4, 0)


async def test_a_join_during_a_gap_gets_no_duplicate(
    node: Lossy,
) -> None:
    first, first_sink = member(node, 1)
    await join(node, first)
    await publish(node, 1)
    node.drop = {2}
    await publish(node, 2)
    await publish(node, 3)  # held behind the missing 2
    late, late_sink = member(node, 2)
    await join(node, late, Catchup(history=10))
    sync = late_sink.frames[0]
    assert (sync["type"], sync["offset"], sync["replayed"]) == ("sync", 1, 1)

    async def both() -> bool:
        return late_sink.offsets() == [1, 2, 3] and first_sink.offsets() == [1, 2, 3]

    await eventually(both, timeout=5)


async def test_presence_coalesces_connections_and_reconnects_of_one_user(node: Lossy) -> None:
    hub = node.hub
    presence = Presence(hub, MemoryPresence(), deliver=node.on_message, ttl=5)
    watcher, seen = member(node, 0)
    hub.join(watcher, "r")

    def events() -> list[tuple[str, str]]:
        return [(f["type"], f["user"]["id"]) for f in seen.frames]

    def connect(n: int) -> Connection:
        handshake = read_handshake(f"c{n}", None, {}, {})
        conn = node.connect(Frames(), handshake, Admission(Identity("u1", "Ann")))
        hub.join(conn, "r")
        presence.join(conn, "r")
        return conn

    first = connect(1)
    second = connect(2)  # same user, second tab
    await presence.flush()
    assert events() == [("member_joined", "u1")]
    presence.drop(first)
    await presence.flush()
    assert events() == [("member_joined", "u1")]  # still there in the other tab
    presence.drop(second)
    third = connect(3)  # a reconnect within one flush interval
    await presence.flush()
    assert events() == [("member_joined", "u1")]
    members = await presence.members("r")
    assert [(m.id, m.name) for m in members] == [("u1", "Ann")]
    presence.drop(third)
    await presence.flush()
    assert events() == [("member_joined", "u1"), ("member_left", "u1")]
    assert await presence.members("r") == []


async def test_members_are_told_when_history_no_longer_has_a_gap() -> None:
    node = Lossy(settings(history_length=2))
    async with node.running():
        conn, sink = member(node, 1)
        await join(node, conn)
        node.drop = {2, 3, 4}
        for n in range(1, 6):
            await publish(node, n)

        async def repaired() -> bool:
            return sink.offsets() == [1, 4, 5]

        await eventually(repaired, timeout=5)
        kinds = [(f["type"], f.get("offset"), f.get("lost")) for f in sink.frames]
        assert kinds == [
            ("message", 1, None),
            ("sync", 3, 2),
            ("message", 4, None),
            ("message", 5, None),
        ]
        assert sink.frames[1]["reason"] == "window_exceeded"
        assert node.timeline.stats()["lost"] == 2


class LinkDown(MemoryBackend):
    """A backend whose reads fail while ``down`` (a Redis outage)."""

    down = True

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Any:
        if self.down:
            raise BroadcastError("link down")
        return await super().read(room, after, limit, epoch=epoch)


async def test_a_confirmed_subscription_cuts_a_failed_reads_backoff_short() -> None:
    log = LinkDown(history_length=50)
    # The first retry of a failed read would come after gap_wait (3 s).
    node = Node(NodeSettings(pod_id="pod-a", gap_wait=3.0, history_length=50), backend=log)
    async with node.running():
        conn, sink = member(node, 1)
        await join(node, conn)
        await publish(node, 1)  # stored, but held: the room's state is unknown
        assert sink.offsets() == []
        log.down = False
        node.on_ready("r")  # the link is back and the subscription confirmed

        async def delivered() -> bool:
            return sink.offsets() == [1]

        # Well inside the 3 s backoff: the confirmation woke the read.
        await eventually(delivered, timeout=1.5)


class Gated(MemoryBackend):
    """A backend whose next reads each wait for a gate the test opens, in
    order; a stubborn one ignores its cancellation, as a backend's read may
    (Python 3.11's ``wait_for`` swallows one that comes as its wait ends)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gates: list[tuple[asyncio.Event, bool]] = []
        self.waiting = 0
        self.answered = 0

    async def read(self, room: str, after: int, limit: int, *, epoch: str | None = None) -> Any:
        if self.gates:
            gate, stubborn = self.gates.pop(0)
            self.waiting += 1
            try:
                await gate.wait()
            except asyncio.CancelledError:
                if not stubborn:
                    raise
                await gate.wait()
            finally:
                self.waiting -= 1
        got = await super().read(room, after, limit, epoch=epoch)
        self.answered += 1  # the reader goes on in this same step
        return got


async def test_a_read_replaced_by_another_never_moves_the_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gap's repair is waiting for its read when the subscription is
    confirmed again: a new read replaces it. Should the old one carry on
    all the same (its cancellation lost), its answer is dropped: the room
    moves on with the new read only, and no reader fails."""
    backend = Gated(history_length=50)
    node = Lossy(settings(history_length=50), backend=backend)
    async with asyncio.timeout(10), node.running():
        conn, sink = member(node, 1)
        await join(node, conn)
        old, new = asyncio.Event(), asyncio.Event()
        backend.gates = [(old, True), (new, False)]
        backend.answered = 0  # the join's read is in
        node.drop = {2}
        for n in (1, 2, 3):
            await publish(node, n)
        assert sink.offsets() == [1]

        async def waiting(count: int) -> bool:
            return backend.waiting == count

        await eventually(lambda: waiting(1))  # the repair's read
        node.on_ready("r")
        await eventually(lambda: waiting(2))  # and the new read
        old.set()
        await eventually(lambda: waiting(1))
        await eventually(lambda: _answered(backend, 1))
        assert sink.offsets() == [1]  # the old read's answer moved nothing
        new.set()

        async def delivered() -> bool:
            return sink.offsets() == [1, 2, 3]

        await eventually(delivered)
        assert node.timeline.stats()["recovered"] == 2
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def _answered(backend: Gated, count: int) -> bool:
    return backend.answered == count


@contextlib.asynccontextmanager
async def behind_a_cutter(
    redis_server: RedisServer, channel_prefix: str
) -> AsyncIterator[tuple[Node, Frames, ReplyCutter]]:
    """A node on Redis through a ``ReplyCutter``, a member in room r, and
    message 1 stored (the room's next append may go as a plain XADD)."""
    cutter = await ReplyCutter(redis_server.port).start()
    node = Node(settings(), backend=quick_broadcaster(cutter.url, "pod-a", channel_prefix))
    try:
        await node.start()
        conn, sink = member(node, 1)
        await join(node, conn)
        assert isinstance(await asyncio.wait_for(publish(node, 1), 5), Stamp)
        yield node, sink, cutter
    finally:
        await node.stop()
        await cutter.stop()


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_a_lost_append_reply_delivers_the_message_once_in_order(
    redis_server: RedisServer, channel_prefix: str, path: str
) -> None:
    """The append (the script, or a plain XADD) ran but its reply was lost
    with the connection: the sender's pod must not show the message
    unstamped; once linked again it finds it in the room's history (by its
    id): stamped, shown once, in order (after a plain XADD, published then)."""
    marker, key = PATHS[path]
    async with behind_a_cutter(redis_server, channel_prefix) as (node, sink, cutter):
        cutter.arm(marker)  # the next append's answer is lost
        stamp = await asyncio.wait_for(publish(node, 2, key), 5)
        assert isinstance(stamp, Stamp)
        assert stamp.offset == 2  # read back from the history, not appended twice
        assert cutter.cut == 1

        async def shown(offsets: list[int]) -> bool:
            return sink.offsets() == offsets

        await eventually(lambda: shown([1, 2]), timeout=5)
        assert isinstance(await asyncio.wait_for(publish(node, 3), 5), Stamp)
        await eventually(lambda: shown([1, 2, 3]), timeout=5)
        messages = [f for f in sink.frames if f["type"] == "message"]
        assert [f["data"] for f in messages] == [1, 2, 3]  # none unstamped, none twice
        stats = node.timeline.stats()
        assert (stats["unknown"], stats["unstamped"]) == (0, 0)


@pytest.mark.parametrize("ran", [True, False], ids=["ran", "never-ran"])
@pytest.mark.parametrize("path", sorted(PATHS))
async def test_an_append_lost_with_two_connections_in_a_row_is_settled_on_the_third(
    redis_server: RedisServer, channel_prefix: str, path: str, ran: bool
) -> None:
    """The connection went with the append in flight (it ran, or never
    reached Redis), and the next one went too, with the pod's look at the
    room's history on it: the pod looks again on the connection after. Its
    sender gets the offset (found, or sent again and stored once), not an
    unknown outcome."""
    marker, key = PATHS[path]
    async with behind_a_cutter(redis_server, channel_prefix) as (node, sink, cutter):
        cutter.arm(marker, swallow=not ran)
        cutter.then(READ.sha.encode())  # the first history read on the next connection
        stamp = await asyncio.wait_for(publish(node, 2, key), 10)
        assert cutter.cut == 2
        assert isinstance(stamp, Stamp), stamp
        assert stamp.offset == 2

        async def shown() -> bool:
            return sink.offsets() == [1, 2]

        await eventually(shown, timeout=5)
        assert redis_server.command("XLEN", _history(redis_server, channel_prefix)) == 2
        stats = node.timeline.stats()
        assert (stats["unknown"], stats["unstamped"]) == (0, 0)


def _history(redis_server: RedisServer, prefix: str) -> str:
    """The key of room r's history stream (one epoch)."""
    (key,) = redis_server.command("KEYS", f"{prefix}*hist:*")
    return key.decode() if isinstance(key, bytes) else str(key)


@pytest.mark.parametrize("path", sorted(PATHS))
async def test_an_append_lost_before_it_ran_is_sent_again_once(
    redis_server: RedisServer, channel_prefix: str, path: str
) -> None:
    """The connection went with the append (the script, or a plain XADD)
    unsent to Redis: the history shows it was not stored, so the pod sends
    it again, ahead of what followed: stored once, in order, acked with its
    offset."""
    marker, key = PATHS[path]
    async with behind_a_cutter(redis_server, channel_prefix) as (node, sink, cutter):
        cutter.arm(marker, swallow=True)  # the next append never reaches Redis
        second = asyncio.ensure_future(publish(node, 2, key))
        third = asyncio.ensure_future(publish(node, 3))
        stamps = await asyncio.wait_for(asyncio.gather(second, third), 5)
        assert [s.offset for s in stamps if isinstance(s, Stamp)] == [2, 3]
        assert cutter.cut == 1

        async def shown() -> bool:
            return sink.offsets() == [1, 2, 3]

        await eventually(shown, timeout=5)
        messages = [f for f in sink.frames if f["type"] == "message"]
        assert [f["data"] for f in messages] == [1, 2, 3]
        assert node.backend.stats()["resent"] >= 1  # its batch (the third may have been in it)
