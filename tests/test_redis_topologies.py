"""Pods on a real Redis Cluster (3 primaries, 3 replicas) and a real Sentinel
set (a primary, a replica, 3 sentinels), started by the suite from the
``redis-server`` binary; primaries killed with SIGKILL and a slot migrated
mid-traffic.

The end state every fault test checks, for every receiver (one per room on
every pod): every message whose sender got an ack with an offset, once, in
offset order; no two messages at one offset (in one epoch).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from realtime import BroadcastError
from realtime.backends.redis.slots import key_slot
from realtime.backends.redis.topology import Topology

from .conftest import PodFactory, redis_pod_env
from .redis_support import REDIS_SERVER
from .redis_topologies import RedisCluster, SentinelSet
from .support import Pod, connect, eventually, get_json, recv_type, send
from .test_presence_store import _prune_dead_pod

pytestmark = pytest.mark.slow

DIRTY = re.compile(r"Task was destroyed|[Uu]nclosed|ResourceWarning|Traceback|never awaited")


# -- the URL ---------------------------------------------------------------------


def test_sentinel_and_cluster_urls_are_read_with_their_hosts_credentials_and_options() -> None:
    sentinel = Topology.from_url(
        "rediss+sentinel://app:s3cret@10.0.0.1:26379,[::1]:26380,sentinel-3/mymaster/2"
        "?sentinel_password=sp4ss&ssl_cert_reqs=none"
    )
    assert (sentinel.kind, sentinel.service, sentinel.node.db) == ("sentinel", "mymaster", 2)
    assert [(s.host, s.port) for s in sentinel.nodes] == [
        ("10.0.0.1", 26379),
        ("::1", 26380),
        ("sentinel-3", 6379),
    ]
    assert {(s.password, s.tls, s.tls_verify) for s in sentinel.nodes} == {("sp4ss", True, False)}
    assert (sentinel.node.username, sentinel.node.password, sentinel.node.tls) == (
        "app",
        "s3cret",
        True,
    )
    cluster = Topology.from_url("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001")
    assert cluster.sharded
    assert [n.port for n in cluster.nodes] == [7000, 7001]
    assert cluster.node.password == "pw"
    assert not cluster.node.tls
    assert Topology.from_url("redis://127.0.0.1:6379/0").kind == "standalone"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://127.0.0.1:26379", "master-name"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "database"),
        ("redis+cluster://127.0.0.1:7000/3", "no database"),
        ("redis+cluster://", "no host"),
        ("redis+cluster://127.0.0.1:notaport", "port"),
        ("redis+swarm://127.0.0.1:1", "unknown scheme"),
    ],
)
def test_a_bad_sentinel_or_cluster_url_is_refused_saying_why(url: str, says: str) -> None:
    with pytest.raises(BroadcastError, match=says):
        Topology.from_url(url)


def test_a_bad_url_stops_start_up_naming_redis_url(pod_factory: PodFactory) -> None:
    with pytest.raises(RuntimeError, match="REDIS_URL"):
        pod_factory({"REDIS_URL": "redis+cluster://127.0.0.1:70000"})


def test_slots_are_the_ones_redis_computes() -> None:
    # CLUSTER KEYSLOT answers, from the Redis documentation
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == 3443
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")
    assert key_slot(b"123456789") == 12739


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    cluster = RedisCluster().start()
    yield cluster
    cluster.close()


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not on PATH")
    sentinels = SentinelSet().start()
    yield sentinels
    sentinels.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def topology_env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    """Pods that notice a failover within a couple of seconds."""
    return redis_pod_env(
        url,
        prefix,
        REDIS_HEARTBEAT_TIMEOUT="2.0",
        REDIS_WAIT_TIMEOUT="0.5",
        RATE_LIMIT_PER_SECOND="0",
        **extra,
    )


def start_pods(
    pod_factory: PodFactory, url: str, prefix: str, count: int, **extra: str
) -> list[Pod]:
    return [
        pod_factory(topology_env(url, prefix, **extra), name=f"pod{i + 1}") for i in range(count)
    ]


def room_channel(prefix: str, room: str) -> str:
    return f"{prefix}:room:{{{room}}}"


def rooms_on(cluster: RedisCluster, prefix: str, port: int, count: int) -> list[str]:
    """``count`` room names whose slots the primary at ``port`` serves."""
    found = []
    for n in range(10_000):
        room = f"r{n}"
        if cluster.owner(room_channel(prefix, room).encode()) == port:
            found.append(room)
            if len(found) == count:
                return found
    raise LookupError(f"no room on {port}")


# -- traffic and its end state -----------------------------------------------------


@dataclass
class Receiver:
    room: str
    pod: str
    ws: aiohttp.ClientWebSocketResponse
    got: list[tuple[str, int, str]] = field(default_factory=list)
    """(epoch, offset, data) of every message frame, in arrival order."""
    unstamped: list[str] = field(default_factory=list)
    syncs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Traffic:
    receivers: list[Receiver]
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)
    """data -> (epoch, offset) of every message acked with an offset."""
    unstamped: int = 0
    sent: int = 0


async def read_frames(receiver: Receiver) -> None:
    while True:
        msg = await receiver.ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return
        frame = orjson.loads(msg.data)
        if frame.get("type") == "message" and frame.get("room") == receiver.room:
            if "offset" in frame:
                receiver.got.append((frame["epoch"], frame["offset"], frame["data"]))
            else:  # not stored (Redis unreachable): this pod's members only
                receiver.unstamped.append(frame["data"])
        elif frame.get("type") == "sync":
            receiver.syncs.append(frame)


async def run_traffic(
    session: aiohttp.ClientSession,
    pods: list[Pod],
    rooms: list[str],
    *,
    per_room: int,
    fault: Callable[[], object],
    gap: float = 0.02,
) -> Traffic:
    """One sender per room (on the pods in turn) sends ``per_room`` numbered
    messages with keys, ``gap`` seconds apart; one receiver per room on
    every pod reads. ``fault`` runs (in a thread) once a third are sent."""
    receivers = []
    for room in rooms:
        for pod in pods:
            ws, _ = await connect(session, pod.ws_url(room))
            receivers.append(Receiver(room, pod.name, ws))
    readers = [asyncio.create_task(read_frames(r)) for r in receivers]
    traffic = Traffic(receivers)
    senders = [
        (await connect(session, pods[i % len(pods)].ws_url(room)))[0]
        for i, room in enumerate(rooms)
    ]

    async def send_room(ws: aiohttp.ClientWebSocketResponse, room: str) -> None:
        pending: dict[int, str] = {}

        async def acks() -> None:
            while pending or traffic.sent < per_room * len(rooms):
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    return
                frame = orjson.loads(msg.data)
                if frame.get("type") != "ack" or frame.get("ref") not in pending:
                    continue
                data = pending.pop(frame["ref"])
                if frame.get("offset") is not None:
                    traffic.acked[data] = (frame["epoch"], frame["offset"])
                else:
                    traffic.unstamped += 1

        reading = asyncio.create_task(acks())
        for n in range(per_room):
            data = f"{room}-{n}"
            pending[n] = data
            traffic.sent += 1
            await send(ws, {"type": "message", "data": data, "ref": n, "key": data})
            await asyncio.sleep(gap)  # steady traffic, so the fault lands mid-traffic
        await asyncio.wait({reading}, timeout=30)
        reading.cancel()
        if pending:
            logs = "\n".join(f"--- {pod.name}\n{pod.log[-4000:]}" for pod in pods)
            raise AssertionError(f"{room}: no ack for {sorted(pending.values())}\n{logs}")

    async def a_third_sent() -> bool:
        return traffic.sent >= per_room * len(rooms) // 3

    async def faulted() -> None:
        await eventually(a_third_sent, timeout=60)
        await asyncio.to_thread(fault)

    await asyncio.gather(
        faulted(), *(send_room(ws, room) for ws, room in zip(senders, rooms, strict=True))
    )

    async def everyone_has_every_acked_message() -> bool:
        for receiver in receivers:
            have = {data for _, _, data in receiver.got}
            wanted = {d for d in traffic.acked if d.rsplit("-", 1)[0] == receiver.room}
            if not wanted <= have:
                return False
        return True

    try:
        await eventually(everyone_has_every_acked_message, timeout=30)
    except AssertionError:
        missing = {
            f"{r.pod}/{r.room}": sorted(
                {d for d in traffic.acked if d.rsplit("-", 1)[0] == r.room}
                - {data for _, _, data in r.got}
            )
            for r in receivers
        }
        logs = "\n".join(f"--- {pod.name}\n{pod.log[-3000:]}" for pod in pods)
        logs += "\n".join(
            f"=== {r.pod}/{r.room}: {r.got[15:30]} syncs {r.syncs}" for r in receivers
        )
        logs += f"\nacked: {sorted(traffic.acked.items())[:80]}"
        raise AssertionError(f"acked messages missing: {missing}\n{logs}") from None
    for ws in senders:
        await ws.close()
    for receiver in receivers:
        await receiver.ws.close()
    for task in readers:
        task.cancel()
    return traffic


def check_end_state(traffic: Traffic) -> None:
    assert traffic.acked, "no message was acked"
    for receiver in traffic.receivers:
        datas = [data for _, _, data in receiver.got] + receiver.unstamped
        assert len(datas) == len(set(datas)), f"{receiver.pod}/{receiver.room}: a duplicate"
        by_epoch: dict[str, list[int]] = {}
        for epoch, offset, _ in receiver.got:
            by_epoch.setdefault(epoch, []).append(offset)
        for epoch, offsets in by_epoch.items():
            assert offsets == sorted(set(offsets)), f"{receiver.pod}/{receiver.room}/{epoch}: order"
        for epoch, offset, data in receiver.got:
            if data in traffic.acked and traffic.acked[data][0] == epoch:
                assert traffic.acked[data][1] == offset, f"{data}: another offset than its ack's"
    # no two messages at one offset, across every receiver
    seen: dict[tuple[str, str, int], str] = {}
    for receiver in traffic.receivers:
        for epoch, offset, data in receiver.got:
            assert seen.setdefault((receiver.room, epoch, offset), data) == data, (
                f"two messages at {receiver.room} {epoch}:{offset}"
            )


def assert_clean(pods: list[Pod]) -> None:
    for pod in pods:
        assert pod.stop() == 0, pod.log
        assert not DIRTY.search(pod.log), pod.log


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    body = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return dict(body["broadcaster"])


# -- Cluster ---------------------------------------------------------------------


async def test_on_a_cluster_each_pod_subscribes_its_rooms_on_their_shards_and_nothing_else(
    cluster: RedisCluster,
    pod_factory: PodFactory,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pods = start_pods(pod_factory, cluster.url, channel_prefix, 2, PUBLISH_API_KEY="k")
    primaries = cluster.primaries()
    rooms = [rooms_on(cluster, channel_prefix, port, 1)[0] for port in primaries]
    members = [(await connect(session, pod.ws_url(room)))[0] for room in rooms for pod in pods]
    everyone, welcomes = zip(*[await connect(session, pod.ws_url()) for pod in pods], strict=True)

    async def subscribed_on_owners() -> bool:
        return all(
            cluster.shardnumsub(
                cluster.owner(room_channel(channel_prefix, r).encode()),
                room_channel(channel_prefix, r),
            )
            == 2
            for r in rooms
        )

    await eventually(subscribed_on_owners, timeout=15)
    for port in primaries:
        # no classic channel for rooms, anywhere: the rooms are sharded
        assert not cluster.channels(port, f"{channel_prefix}:*")
        # one link per pod per shard
        names = cluster.command(port, "CLIENT", "LIST").decode()
        assert names.count(":link") == 2, names

    # a message in each room crosses pods; a global message reaches everyone
    for i, room in enumerate(rooms):
        await send(members[2 * i], {"type": "message", "data": f"in {room}", "ref": 1})
    for i, room in enumerate(rooms):
        for ws in members[2 * i : 2 * i + 2]:
            got = await recv_type(ws, "message")
            assert (got["room"], got["data"], got["offset"]) == (room, f"in {room}", 1)
    await send(everyone[0], {"type": "message", "data": "to all"})
    for ws in [*everyone, *members]:
        assert (await recv_type(ws, "message"))["data"] == "to all"

    # the users API across shards: a message to the user on the other pod, once
    user = welcomes[0]["user"]["id"]
    url = f"{pods[1].base}/api/chat-api/users/{user}/messages"
    headers = {"Authorization": "Bearer k", "Idempotency-Key": "n1"}
    for status in (202, 200):  # the retry is a duplicate: sent once
        async with session.post(url, json={"data": "to you"}, headers=headers) as resp:
            assert resp.status == status, await resp.text()
    got = await recv_type(everyone[0], "message")
    assert (got["to"], got["data"]) == (user, "to you")

    # presence across shards: a second user in the last room is seen on the other pod
    joiner, _ = await connect(session, pods[0].ws_url(rooms[-1], name="zoe"))
    joined = await recv_type(members[-1], "member_joined")
    while joined["user"]["name"] != "zoe":  # the others' joins came first
        joined = await recv_type(members[-1], "member_joined")
    # the history of a room on any shard
    late, _ = await connect(session, pods[1].ws_url(rooms[0], history="5"))
    sync = await recv_type(late, "sync")
    assert sync["replayed"] == 1

    body = await stats(session, pods[0])
    assert body["topology"] == "cluster"
    assert len(body["shards"]) == 3
    assert body["state"] == "connected"
    assert body["wait_replicas"] == 1
    for ws in [*members, *everyone, joiner, late]:
        await ws.close()
    assert_clean(pods)
    for port in primaries:
        assert "chat-api:" not in cluster.command(port, "CLIENT", "LIST").decode()


async def test_a_cluster_primary_killed_mid_traffic_loses_no_acked_message(
    cluster: RedisCluster,
    pod_factory: PodFactory,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pods = start_pods(pod_factory, cluster.url, channel_prefix, 2)
    victim = cluster.primaries()[0]
    rooms = [
        *rooms_on(cluster, channel_prefix, victim, 2),
        rooms_on(cluster, channel_prefix, cluster.primaries()[1], 1)[0],
    ]
    traffic = await run_traffic(
        session, pods, rooms, per_room=60, fault=lambda: cluster.kill_primary(victim)
    )
    check_end_state(traffic)

    async def followed() -> bool:
        # a pod whose messages were all acked before the kill learns of the
        # promotion from its own lookups, a moment after the cluster settles
        body = await stats(session, pods[0])
        return body["topology_changes"] >= 1 and f"127.0.0.1:{victim}" not in body["primaries"]

    await eventually(followed, timeout=10)
    assert_clean(pods)


async def test_a_busy_rooms_slot_migrated_mid_traffic_loses_nothing(
    cluster: RedisCluster,
    pod_factory: PodFactory,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pods = start_pods(pod_factory, cluster.url, channel_prefix, 2)
    source, target = cluster.primaries()[:2]
    room = rooms_on(cluster, channel_prefix, source, 1)[0]
    slot = key_slot(room_channel(channel_prefix, room).encode())
    traffic = await run_traffic(
        session, pods, [room], per_room=90, fault=lambda: cluster.migrate_slot(slot, target)
    )
    check_end_state(traffic)
    assert len(traffic.acked) == 90, "a migration must not cost an append"
    assert cluster.owner(room_channel(channel_prefix, room).encode()) == target

    a, _ = await connect(session, pods[0].ws_url(room))
    b, _ = await connect(session, pods[1].ws_url(room))
    channel = room_channel(channel_prefix, room)

    async def subscribed_at_target() -> bool:
        return (
            cluster.shardnumsub(target, channel) == 2 and cluster.shardnumsub(source, channel) == 0
        )

    await eventually(subscribed_at_target, timeout=10)
    await send(a, {"type": "message", "data": "after the move", "ref": 1})
    got = await recv_type(b, "message")
    assert (got["data"], got["offset"]) == ("after the move", traffic.acked[f"{room}-89"][1] + 1)
    await a.close()
    await b.close()
    assert_clean(pods)


# -- Sentinel --------------------------------------------------------------------


async def test_a_sentinel_primary_killed_mid_traffic_loses_no_acked_message(
    sentinel_set: SentinelSet,
    pod_factory: PodFactory,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pods = start_pods(pod_factory, sentinel_set.url, channel_prefix, 2)
    old = sentinel_set.primary_port()
    ready = await get_json(session, f"{pods[0].base}/readyz")
    assert ready["ready"] is True
    assert ready["primaries"] == [f"127.0.0.1:{old}"]
    before = await stats(session, pods[0])
    assert before["primaries"] == [f"127.0.0.1:{old}"]

    new_port: list[int] = []
    traffic = await run_traffic(
        session,
        pods,
        ["general", "random"],
        per_room=60,
        fault=lambda: new_port.append(sentinel_set.kill_primary()),
    )
    check_end_state(traffic)

    async def following() -> bool:
        body = await stats(session, pods[1])
        return bool(
            body["primaries"] == [f"127.0.0.1:{new_port[0]}"] and body["state"] == "connected"
        )

    await eventually(following, timeout=15)
    after = await stats(session, pods[1])
    assert after["topology_changes"] >= 1
    assert after["primary_since"] > before["primary_since"]
    ready = await get_json(session, f"{pods[1].base}/readyz")
    assert ready["primaries"] == [f"127.0.0.1:{new_port[0]}"]
    assert ready["primary_since"] == after["primary_since"]
    assert_clean(pods)


async def test_a_replica_promoted_behind_moves_the_room_to_a_new_epoch(
    sentinel_set: SentinelSet,
    pod_factory: PodFactory,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    # Without waiting for replicas, a pod delivers what the primary stored
    # at once; a replica that never got it and is promoted is behind.
    pods = start_pods(pod_factory, sentinel_set.url, channel_prefix, 2, REDIS_WAIT_REPLICAS="0")
    a, _ = await connect(session, pods[0].ws_url("general"))
    b, _ = await connect(session, pods[1].ws_url("general"))
    for n in range(3):
        await send(a, {"type": "message", "data": f"kept {n}", "ref": n})
    for ws in (a, b):
        kept = [await recv_type(ws, "message") for _ in range(3)]
        assert [m["offset"] for m in kept] == [1, 2, 3]
    epoch = kept[0]["epoch"]
    old = sentinel_set.primary_port()
    replica = next(s for s in sentinel_set.servers if s.port != old)
    sentinel_set.wait_ready()
    # cut replication: the replica keeps what it has and takes nothing more
    replica.command("CONFIG", "SET", "masterauth", "wrong-on-purpose")
    replica.command("CLIENT", "KILL", "TYPE", "master")
    hist_key = f"{channel_prefix}:room:{{general}}:hist:{epoch}"
    assert replica.command("XLEN", hist_key) == 3
    lost = []
    for n in range(2):
        await send(a, {"type": "message", "data": f"lost {n}", "ref": 10 + n})
    for ws in (a, b):
        lost = [await recv_type(ws, "message") for _ in range(2)]
        assert [m["offset"] for m in lost] == [4, 5]
    assert lost[0]["epoch"] == epoch
    assert replica.command("XLEN", hist_key) == 3  # it never got them
    new = sentinel_set.kill_primary()
    assert new == replica.port

    try:
        syncs = [await recv_type(ws, "sync", timeout=20) for ws in (a, b)]
    except TimeoutError:
        logs = "\n".join(f"--- {pod.name}\n{pod.log[-4000:]}" for pod in pods)
        raise AssertionError(f"no epoch_changed\n{logs}") from None
    for sync in syncs:
        assert sync["reason"] == "epoch_changed"
        assert sync["epoch"] != epoch
    await send(b, {"type": "message", "data": "after", "ref": 20})
    for ws in (a, b):
        after = await recv_type(ws, "message", timeout=10)
        assert after["data"] == "after"
        assert after["epoch"] == syncs[0]["epoch"]
        assert after["offset"] > 5  # never an offset a client saw for another message
    body = await stats(session, pods[0])
    assert body["rewinds"] >= 1 or (await stats(session, pods[1]))["rewinds"] >= 1
    await a.close()
    await b.close()
    assert_clean(pods)


async def test_on_a_cluster_one_refresh_prunes_a_dead_pod_in_rooms_of_every_shard(
    cluster: RedisCluster, channel_prefix: str
) -> None:
    # The refresh script takes many rooms a call: on a Cluster only rooms of
    # one slot share a call (a script's keys must), on whichever shard owns it.
    rooms = [f"room-{i}" for i in range(30)]
    slots = {key_slot(f"{{{room}}}".encode()) for room in rooms}
    assert len(slots) == len(rooms)  # 30 slots: every shard has some
    pruned = await _prune_dead_pod(cluster.url, channel_prefix, rooms)
    assert pruned == sorted((room, f"u{i}") for i, room in enumerate(rooms))
