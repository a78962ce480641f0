"""One order for everyone, no loss: real pods, a real Redis, faults on purpose.

Each receiver must end with the room's messages in offset order, every offset
exactly once, and the same sequence as every other receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer
from .support import Pod, connect, eventually, get_json, recv_type, send

pytestmark = pytest.mark.slow

ROOM = "order"
MIN_KILLS = 8  # subscriptions killed back to back, in the killed-subscription test
MAX_KILLS = 12  # and at most


class Reader:
    """A client that records every message frame of a room as it arrives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, sync: dict[str, Any]) -> None:
        self.ws = ws
        self.sync = sync
        self.frames: list[dict[str, Any]] = []
        self.syncs: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, pod: Pod, **query: str) -> Reader:
        ws, _ = await connect(session, pod.ws_url(ROOM, **(query or {"history": "0"})))
        sync = await recv_type(ws, "sync")
        return cls(ws, sync)

    async def _run(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    frame = orjson.loads(msg.data)
                    if frame.get("type") == "message":
                        self.frames.append(frame)
                        self._changed.set()
                    elif frame.get("type") == "sync":
                        self.syncs.append(frame)
        finally:
            self.closed.set()
            self._changed.set()

    @property
    def offsets(self) -> list[int | None]:
        return [f.get("offset") for f in self.frames]  # None: delivered unstamped

    async def wait_for(self, count: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while len(self.frames) < count and not self.closed.is_set():
                self._changed.clear()
                await self._changed.wait()
        assert len(self.frames) >= count, f"got {len(self.frames)} of {count}"

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def flood(
    ws: aiohttp.ClientWebSocketResponse,
    tag: str,
    count: int,
    pause_every: int = 0,
    midway: asyncio.Event | None = None,
    until: asyncio.Event | None = None,
) -> int:
    """Send ``count`` messages; with ``until``, go on (up to 10x) until it is
    set and a tenth of ``count`` more have been sent after it. ``midway`` is
    set a third of the way. Returns how many were sent."""
    n = after = 0
    while n < count or (until is not None and after < count // 10 and n < 10 * count):
        await send(ws, {"type": "message", "data": {"s": tag, "n": n}})
        if pause_every and n % pause_every == 0:
            await asyncio.sleep(0.005)  # steady traffic, not one burst
        if midway is not None and n == count // 3:
            midway.set()
        if until is not None and until.is_set():
            after += 1
        n += 1
    return n


def assert_complete(frames: list[dict[str, Any]], first: int, last: int) -> None:
    offsets = [f["offset"] for f in frames]
    assert offsets == list(range(first, last + 1)), "gap, duplicate or reorder"
    per_sender: dict[str, list[int]] = {}
    for f in frames:
        per_sender.setdefault(f["data"]["s"], []).append(f["data"]["n"])
    for ns in per_sender.values():
        assert ns == sorted(ns), "a sender's messages were reordered"


async def shortfall(
    session: aiohttp.ClientSession, readers: list[Reader], total: int, *pods: Pod
) -> str:
    """What was missing when readers did not all get ``total`` messages:
    the offsets each lacks, and the counters that say where they went."""
    lines = [f"not every reader got {total} messages"]
    for i, reader in enumerate(readers):
        missing = sorted(set(range(1, total + 1)) - set(reader.offsets))
        lines.append(f"reader {i}: {len(reader.frames)} frames, missing {missing[:20]}")
    for pod in pods:
        stats = await get_json(session, pod.base + "/api/chat-api/ws/stats")
        timeline = {k: stats["timeline"][k] for k in ("lost", "unknown", "unstamped", "recovered")}
        lines.append(f"{pod.name}: {timeline} {stats['broadcaster']}")
    return "\n".join(lines)


def two_pods(pod_factory: PodFactory, url: str, prefix: str, **extra: str) -> tuple[Pod, Pod]:
    # Floods from one client at full speed: the per-connection rate limit is off.
    env = redis_pod_env(url, prefix, HISTORY_LENGTH="5000", RATE_LIMIT_PER_SECOND="0", **extra)
    return pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")


async def test_two_senders_on_two_pods_every_receiver_sees_one_order(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    a, b = two_pods(pod_factory, shared_redis_url, channel_prefix)
    readers = [await Reader.open(session, pod) for pod in (a, b, a, b)]
    senders = [await Reader.open(session, pod) for pod in (a, b)]
    per_sender = 500
    await asyncio.wait_for(
        asyncio.gather(
            flood(senders[0].ws, "A", per_sender), flood(senders[1].ws, "B", per_sender)
        ),
        60,
    )
    everyone = readers + senders
    for reader in everyone:
        await reader.wait_for(2 * per_sender)
    reference = [(f["offset"], f["data"]) for f in readers[0].frames]
    for reader in everyone:
        assert_complete(reader.frames, 1, 2 * per_sender)
        assert [(f["offset"], f["data"]) for f in reader.frames] == reference
    for reader in everyone:
        await reader.close()


async def test_a_killed_subscription_loses_nothing(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    redis_server: RedisServer,
    channel_prefix: str,
) -> None:
    a, b = two_pods(pod_factory, redis_server.url, channel_prefix)
    readers = [await Reader.open(session, pod) for pod in (a, b)]
    senders = [await Reader.open(session, pod) for pod in (a, b)]
    per_sender = 400
    midway = asyncio.Event()
    stop = asyncio.Event()  # the senders go on until the kills are over

    async def recovered() -> int:
        total = 0
        for pod in (a, b):
            stats = await get_json(session, pod.base + "/api/chat-api/ws/stats")
            total += stats["timeline"]["recovered"]
        return int(total)

    async def both_subscribed() -> bool:
        listing = redis_server.command("CLIENT", "LIST", "TYPE", "pubsub")
        return len(listing.splitlines()) >= 2

    async def kill_until_recovered() -> None:
        # The pods resubscribe within a few milliseconds, so one kill can fall
        # between two publishes and miss nothing. Kill again (both pods back
        # first), the senders still sending, until a pod has read back what
        # its subscription missed: that repair is what this test is about.
        # The first kills come back to back: a pod is still reading back
        # (what it missed, and whether appends in flight were stored) on the
        # connection the next one cuts.
        await midway.wait()  # a third sent
        try:
            for kill in range(1, MAX_KILLS + 1):
                await eventually(both_subscribed)
                assert redis_server.kill_pubsub_clients() >= 2
                if kill < MIN_KILLS:
                    continue
                with contextlib.suppress(AssertionError):  # nothing within 0.3 s: again
                    await eventually(recovered, timeout=0.3)
                    return
        finally:
            stop.set()

    sent_a, sent_b, _ = await asyncio.wait_for(
        asyncio.gather(
            flood(senders[0].ws, "A", per_sender, pause_every=2, midway=midway, until=stop),
            flood(senders[1].ws, "B", per_sender, pause_every=2, until=stop),
            kill_until_recovered(),
        ),
        60,
    )
    total = sent_a + sent_b
    a.wait_for_log("redis link resubscribed")
    b.wait_for_log("redis link resubscribed")
    try:
        for reader in readers + senders:
            await reader.wait_for(total)
    except TimeoutError:
        raise AssertionError(await shortfall(session, readers + senders, total, a, b)) from None
    for reader in readers + senders:
        assert_complete(reader.frames, 1, total)
    reference = readers[0].frames
    for reader in readers + senders:
        assert reader.frames == reference
        await reader.close()
    assert await recovered() > 0, "every outage fell between messages: nothing was tested"


async def test_clients_of_a_killed_pod_resume_on_another_without_loss(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    a, b = two_pods(pod_factory, shared_redis_url, channel_prefix)
    victims = [await Reader.open(session, a) for _ in range(3)]
    sender = await Reader.open(session, b)
    total = 600

    midway = asyncio.Event()

    async def kill_midway() -> None:
        await midway.wait()
        a.signal(signal.SIGKILL)

    await asyncio.wait_for(
        asyncio.gather(flood(sender.ws, "B", total, pause_every=2, midway=midway), kill_midway()),
        60,
    )
    await sender.wait_for(total)
    for victim in victims:
        async with asyncio.timeout(10):
            await victim.closed.wait()
        seen = victim.frames
        assert len(seen) < total, "the pod died after the traffic: nothing was tested"
        last = seen[-1]
        back = await Reader.open(session, b, since=str(last["offset"]), epoch=last["epoch"])
        assert back.sync["complete"] is True
        await back.wait_for(total - len(seen))
        assert_complete(seen + back.frames, 1, total)
        await back.close()
    await sender.close()


async def test_window_exceeded_and_flushed_redis_are_told_across_pods(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    redis_server: RedisServer,
    channel_prefix: str,
) -> None:
    env = redis_pod_env(redis_server.url, channel_prefix, HISTORY_LENGTH="5")
    a, b = pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")
    sender = await Reader.open(session, a)
    await flood(sender.ws, "A", 12)
    await sender.wait_for(12)
    epoch = sender.frames[0]["epoch"]

    # Missed more than the history keeps: told, and given what is kept.
    late = await Reader.open(session, b, since="2", epoch=epoch)
    assert late.sync["complete"] is False
    assert late.sync["reason"] == "window_exceeded"
    assert (late.sync["first"], late.sync["offset"], late.sync["replayed"]) == (8, 12, 5)
    await late.wait_for(5)
    assert late.offsets == [8, 9, 10, 11, 12]

    # Redis loses the room's state: live members are told, offsets restart.
    redis_server.command("FLUSHALL")
    await flood(sender.ws, "A", 1)
    await late.wait_for(6)
    assert late.frames[-1]["offset"] == 1
    assert late.frames[-1]["epoch"] != epoch
    assert [(f["reason"], f["epoch"]) for f in late.syncs] == [
        ("epoch_changed", late.frames[-1]["epoch"])
    ]
    back = await Reader.open(session, a, since="12", epoch=epoch)
    assert back.sync["complete"] is False
    assert back.sync["reason"] == "epoch_changed"
    assert back.sync["epoch"] == late.frames[-1]["epoch"]
    await back.wait_for(1)
    assert back.offsets == [1]
    for reader in (sender, late, back):
        await reader.close()


async def test_history_on_join_during_cross_pod_traffic_has_no_gap_or_duplicate(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    a, b = two_pods(pod_factory, shared_redis_url, channel_prefix)
    sender = await Reader.open(session, a)
    midway, synced = asyncio.Event(), asyncio.Event()
    # 400 at least, and on until every joiner has its sync (and 40 more): the
    # catch-ups surely happen during the traffic, however slow the machine.
    flooding = asyncio.create_task(
        flood(sender.ws, "A", 400, pause_every=2, midway=midway, until=synced)
    )
    await asyncio.wait_for(midway.wait(), 30)
    # Joined on the other pod while messages keep coming (its first join there
    # also subscribes the pod to the room mid-traffic).
    joiners = await asyncio.gather(
        *(Reader.open(session, pod, history="50") for pod in (b, b, a, b))
    )
    synced.set()
    total = await asyncio.wait_for(flooding, 60)
    for joiner in joiners:
        replayed = joiner.sync["replayed"]
        # after the first quarter (midway is a third sent; a few still in flight)
        assert 400 // 4 <= joiner.sync["offset"] < total, (joiner.sync, total)
        await joiner.wait_for(total - joiner.sync["offset"] + replayed)
        first = joiner.frames[0]["offset"]
        assert replayed > 0
        assert_complete(joiner.frames, first, total)
        await joiner.close()
    await sender.close()
