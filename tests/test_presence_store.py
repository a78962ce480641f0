"""Presence stores in-process: memory, and the Redis scripts on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from realtime import Member, PresenceStore, RedisBackend
from realtime.backends import PRESENCE_BURST, MemoryPresence
from realtime.backends.redis.presence import REFRESH_ROOMS
from realtime.core.sequencer import Entry

from .redis_support import RedisServer
from .support import eventually

Make = Callable[..., PresenceStore]


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, channel_prefix: str) -> AsyncIterator[Make]:
    started: list[RedisBackend] = []

    async def factory(pod_id: str = "pod-a", ttl: float = 5.0) -> PresenceStore:
        if request.param == "memory":
            return MemoryPresence()
        backend = RedisBackend(
            request.getfixturevalue("shared_redis_url"),
            pod_id=pod_id,
            channel_prefix=channel_prefix,
        )
        await backend.start(Ignore())
        started.append(backend)
        return backend.presence(ttl)

    yield factory  # type: ignore[misc]
    for backend in started:
        async with asyncio.timeout(5):
            await backend.stop()


class Ignore:
    """A ``BackendHandler`` for a backend used for its presence store only."""

    def on_entry(self, room: str, entry: Entry) -> None:
        pass

    def on_message(self, room: str | None, payload: bytes) -> None:
        pass

    def on_ready(self, room: str) -> None:
        pass


def users(n: int, start: int = 0) -> list[Member]:
    return [Member(f"u{i}", f"user {i}", 1_700_000_000_000 + i) for i in range(start, start + n)]


def decoded(events: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(e) for e in events]


async def test_joins_and_leaves_become_events(make: Make) -> None:
    backend = await make()
    joined = decoded(await backend.update("r", users(2), []))
    assert [(e["type"], e["user"]["id"]) for e in joined] == [
        ("member_joined", "u0"),
        ("member_joined", "u1"),
    ]
    assert {"room", "ts"} <= joined[0].keys()
    assert [m.id for m in await backend.members("r")] == ["u0", "u1"]
    left = decoded(await backend.update("r", [], ["u0"]))
    assert [(e["type"], e["user"]) for e in left] == [
        ("member_left", {"id": "u0", "name": "user 0"})
    ]
    assert await backend.members("r") == users(1, 1)


async def test_a_burst_becomes_one_member_list(make: Make) -> None:
    backend = await make()
    events = decoded(await backend.update("r", users(PRESENCE_BURST + 2), []))
    assert len(events) == 1
    assert events[0]["type"] == "presence"
    assert events[0]["room"] == "r"
    assert events[0]["members"] == [m.as_json() for m in users(PRESENCE_BURST + 2)]


async def test_a_user_on_two_pods_joins_and_leaves_once(make: Make) -> None:
    a, b = await make("pod-a"), await make("pod-b")
    if isinstance(a, MemoryPresence):
        pytest.skip("one pod only in local-only mode")
    ann = users(1)
    assert len(await a.update("r", ann, [])) == 1
    assert await b.update("r", ann, []) == []  # already in the room, on pod-a
    assert await a.update("r", [], ["u0"]) == []  # still in it, on pod-b
    assert len(await b.update("r", [], ["u0"])) == 1


async def test_a_dead_pods_users_are_pruned_with_member_left(make: Make) -> None:
    dead, alive = await make("pod-dead", ttl=0.3), await make("pod-alive", ttl=0.3)
    if isinstance(dead, MemoryPresence):
        pytest.skip("one pod only in local-only mode")
    await dead.update("r", users(2), [])
    await alive.update("r", users(1, 5), [])

    pruned: list[dict[str, Any]] = []

    async def pruned_both() -> bool:  # the live pod refreshes; the dead one cannot
        pruned.extend(decoded([e for _, e in await alive.refresh(["r"])]))
        return len(pruned) >= 2

    await eventually(pruned_both, timeout=5)
    assert sorted(e["user"]["id"] for e in pruned) == ["u0", "u1"]
    assert {e["type"] for e in pruned} == {"member_left"}
    assert [m.id for m in await alive.members("r")] == ["u5"]
    assert await alive.refresh(["r"]) == []


async def test_one_refresh_prunes_many_rooms_even_after_redis_forgot_the_scripts(
    make: Make, shared_redis_url: str
) -> None:
    # A pod's refresh covers every room it hosts in one batch per primary;
    # each room's events come back under its own name, in the order asked,
    # and a Redis that lost its scripts (restart, SCRIPT FLUSH) has them
    # loaded again and every room refreshed.
    dead, alive = await make("pod-dead", ttl=0.3), await make("pod-alive", ttl=0.3)
    if isinstance(dead, MemoryPresence):
        pytest.skip("one pod only in local-only mode")
    rooms = [f"r{i}" for i in range(40)]
    for i, room in enumerate(rooms):
        await dead.update(room, users(1, i), [])
        await alive.update(room, users(1, 100), [])
    client = aioredis.from_url(shared_redis_url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()

    pruned: list[tuple[str, dict[str, Any]]] = []

    async def pruned_all() -> bool:
        pruned.extend((room, orjson.loads(e)) for room, e in await alive.refresh(rooms))
        return len(pruned) >= len(rooms)

    await eventually(pruned_all, timeout=5)
    assert [room for room, _ in pruned] == rooms
    assert [(e["type"], e["room"], e["user"]["id"]) for _, e in pruned] == [
        ("member_left", room, f"u{i}") for i, room in enumerate(rooms)
    ]
    assert await alive.refresh(rooms) == []


async def _prune_dead_pod(url: str, prefix: str, rooms: list[str]) -> list[tuple[str, str]]:
    """A pod that dies in every room of ``rooms`` (its TTL runs out) and a live
    one that refreshes them all until every room's ``member_left`` came back:
    ``(room, user id)`` sorted. (The dead pod's entries expire room by room,
    and each script call reads Redis's clock once, on its own shard: one
    refresh may prune a later room before an earlier one that the next
    refresh prunes. Within one refresh, rooms come back in the order asked.)"""
    dead = RedisBackend(url, pod_id="pod-dead", channel_prefix=prefix)
    alive = RedisBackend(url, pod_id="pod-alive", channel_prefix=prefix)
    await dead.start(Ignore())
    await alive.start(Ignore())
    try:
        gone, live = dead.presence(0.3), alive.presence(0.3)
        for i, room in enumerate(rooms):
            await gone.update(room, users(1, i), [])
            await live.update(room, users(1, 10_000), [])
        await dead.stop()
        pruned: list[tuple[str, str]] = []

        async def pruned_all() -> bool:
            now = await live.refresh(rooms)
            positions = [rooms.index(room) for room, _ in now]
            assert positions == sorted(positions)
            for room, event in now:
                e = orjson.loads(event)
                assert (e["type"], e["room"]) == ("member_left", room)
                pruned.append((room, e["user"]["id"]))
            return len(pruned) >= len(rooms)

        await eventually(pruned_all, timeout=10)
        assert await live.refresh(rooms) == []
        assert [m.id for m in await live.members(rooms[-1])] == ["u10000"]
        return sorted(pruned)
    finally:
        await alive.stop()
        await dead.stop()


async def test_a_refresh_calls_the_script_once_per_hundred_rooms(
    redis_server: RedisServer, channel_prefix: str
) -> None:
    # Redis's own cost of a script call is shared by up to REFRESH_ROOMS rooms.
    rooms = [f"r{i}" for i in range(2 * REFRESH_ROOMS + 10)]
    pruned = await _prune_dead_pod(redis_server.url, channel_prefix, rooms)
    assert pruned == sorted((room, f"u{i}") for i, room in enumerate(rooms))
    redis_server.command("CONFIG", "RESETSTAT")
    backend = RedisBackend(redis_server.url, pod_id="pod-x", channel_prefix=channel_prefix)
    await backend.start(Ignore())
    try:
        assert await backend.presence(5.0).refresh(rooms) == []
    finally:
        await backend.stop()
    stats = redis_server.command("INFO", "commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3  # 210 rooms: 100, 100 and 10


async def test_a_refresh_pushes_the_keys_ttls_forward_once_a_ttl(
    redis_server: RedisServer, channel_prefix: str
) -> None:
    # Every refresh pushes the pod's expiry forward in each room (and
    # prunes); the keys' own TTLs (three presence TTLs) only the first one
    # and then once a TTL has passed (every third refresh: they come every
    # third of it), so two in three cost Redis one command less a room.
    ttl = 1.0
    backend = RedisBackend(redis_server.url, pod_id="pod-a", channel_prefix=channel_prefix)
    await backend.start(Ignore())
    try:
        store = backend.presence(ttl)
        await store.update("r", users(1), [])
        pods_key, base = backend.names.presence_keys("r")
        own = base + "pod-a"

        def ttls() -> list[int]:
            return [int(redis_server.command("PTTL", key)) for key in (own, pods_key)]

        def expiry() -> float:
            return float(redis_server.command("ZSCORE", pods_key, "pod-a"))

        def pexpires() -> int:
            stats = redis_server.command("INFO", "commandstats")
            return int(stats.get("cmdstat_pexpire", {}).get("calls", 0))

        for key in (own, pods_key):
            redis_server.command("PEXPIRE", key, 2000)
        redis_server.command("CONFIG", "RESETSTAT")
        assert await store.refresh(["r"]) == []  # the first: TTLs too
        assert pexpires() == 2
        assert min(ttls()) > 2000

        for key in (own, pods_key):
            redis_server.command("PEXPIRE", key, 2000)
        first = expiry()
        redis_server.command("CONFIG", "RESETSTAT")

        async def later() -> bool:  # Redis's clock (ms) has moved on
            seconds, micros = redis_server.command("TIME")
            return int(seconds) * 1000 + int(micros) // 1000 > first - ttl * 1000 + 5

        await eventually(later)
        assert await store.refresh(["r"]) == []  # right after: the expiry only
        assert pexpires() == 0
        assert max(ttls()) <= 2000
        assert expiry() > first
        assert [m.id for m in await store.members("r")] == ["u0"]
        # one that finds the pods set gone does not make it again: it would
        # have no TTL (the next that pushes the TTLs makes it, with one)
        redis_server.command("DEL", pods_key)
        assert await store.refresh(["r"]) == []
        assert redis_server.command("EXISTS", pods_key) == 0

        async def ttls_pushed() -> bool:  # a TTL after the first: TTLs too
            await store.refresh(["r"])
            return min(ttls()) > 2000

        await eventually(ttls_pushed, timeout=5)
    finally:
        await backend.stop()
