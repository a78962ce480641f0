"""RedisBackend in-process against a private redis-server: URLs, the
envelope, and publishing while Redis is gone."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
import redis

from realtime import Identity, LinkState, Message, RedisBackend
from realtime.backends import Stamp, Unstored
from realtime.backends.base import Member
from realtime.core.connection import holding_writes
from realtime.core.sequencer import Entry

from .redis_support import RedisServer, ReplyCutter
from .support import eventually

Delivered = list[tuple[str | None, bytes]]


class Handler:
    """A ``BackendHandler`` that keeps unordered messages in ``delivered``
    (room entries too, as their client payloads)."""

    def __init__(self, delivered: Delivered) -> None:
        self.delivered = delivered

    def on_entry(self, room: str, entry: Entry) -> None:
        self.delivered.append((room, entry.payload))

    def on_message(self, room: str | None, payload: bytes) -> None:
        self.delivered.append((room, payload))

    def on_ready(self, room: str) -> None:
        pass


def send(backend: RedisBackend, msg: Message) -> None:
    """Publish ``msg`` unordered, as the node publishes a global message."""
    backend.publish(msg.room, msg.encode())


class Pods:
    """Broadcasters started in this test; all stopped at the end."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.started: list[RedisBackend] = []

    async def start(
        self,
        url: str,
        pod_id: str,
        *,
        wait: bool = True,
        history_length: int = 100,
        flush_delay: float = 0.002,
    ) -> tuple[RedisBackend, Delivered]:
        delivered: Delivered = []

        handler = Handler(delivered)
        broadcaster = RedisBackend(
            url,
            pod_id=pod_id,
            channel_prefix=self.prefix,
            heartbeat_interval=0.2,
            heartbeat_timeout=1.0,
            reconnect_max_delay=0.3,
            history_length=history_length,
            flush_delay=flush_delay,
        )
        self.started.append(broadcaster)
        async with asyncio.timeout(5):
            await broadcaster.start(handler)
        if wait:
            await eventually(_is(broadcaster, LinkState.CONNECTED))
        return broadcaster, delivered


def _is(broadcaster: RedisBackend, state: LinkState) -> Callable[[], asyncio.Future[bool]]:
    async def check() -> bool:
        return broadcaster.state is state

    return check  # type: ignore[return-value]


@pytest.fixture
async def pods(channel_prefix: str) -> AsyncIterator[Pods]:
    made = Pods(channel_prefix)
    yield made
    for broadcaster in made.started:
        async with asyncio.timeout(2):  # prompt, whatever state Redis is in
            await broadcaster.stop()


def message(room: str | None, data: object) -> Message:
    return Message(id="m-1", room=room, sender=Identity("u1", "Ann"), ts=1, data=data)


async def wait_subscribed(broadcaster: RedisBackend, count: int) -> None:
    async def check() -> bool:
        return broadcaster.stats()["subscribed_channels"] == count

    await eventually(check)


@pytest.fixture
def secured_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer(password="pa55-w0rd").start()
    yield server  # type: ignore[misc]
    server.close()


@pytest.mark.parametrize("kind", ["redis", "unix"])
async def test_urls_with_password_and_db(pods: Pods, secured_redis: RedisServer, kind: str) -> None:
    url = secured_redis.url if kind == "redis" else secured_redis.unix_url + "&db=3"
    a, _ = await pods.start(url, "pod-a")
    b, from_b = await pods.start(url, "pod-b")
    b.subscribe("general")
    await wait_subscribed(b, 3)
    send(a, message("general", {"text": "hi"}))

    async def arrived() -> bool:
        return len(from_b) == 1

    await eventually(arrived)
    assert from_b == [("general", message("general", {"text": "hi"}).encode())]


async def test_a_wrong_password_keeps_retrying_and_is_never_logged(
    pods: Pods, secured_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="realtime")
    url = f"redis://:not-the-password@127.0.0.1:{secured_redis.port}/0"
    broadcaster, delivered = await pods.start(url, "pod-a", wait=False)

    async def failed_twice() -> bool:
        return int(str(broadcaster.stats()["connect_failures"])) >= 2

    await eventually(failed_twice)
    assert broadcaster.state is LinkState.CONNECTING
    send(broadcaster, message(None, "still local"))  # never raises
    assert len(delivered) == 1
    assert "WRONGPASS" in caplog.text or "invalid" in caplog.text.lower()
    assert "not-the-password" not in caplog.text
    assert sum("redis unreachable" in r.getMessage() for r in caplog.records) == 1


async def test_foreign_envelopes_are_handed_over_undecoded_and_junk_is_skipped(
    pods: Pods, redis_server: RedisServer
) -> None:
    broadcaster, delivered = await pods.start(redis_server.url, "pod-a")
    broadcaster.subscribe("general")
    await wait_subscribed(broadcaster, 3)
    channel = f"{pods.prefix}:room:general"
    redis_server.command("PUBLISH", channel, b"no-newline-here")
    redis_server.command("PUBLISH", channel, b"pod-a\n" + b'{"mine":1}')
    redis_server.command("PUBLISH", channel, b"pod-b\n" + b'{"not": "re-encoded"}')
    redis_server.command("PUBLISH", f"{pods.prefix}:room:elsewhere", b"pod-b\n{}")

    async def arrived() -> bool:
        return len(delivered) == 1

    await eventually(arrived)
    assert delivered == [("general", b'{"not": "re-encoded"}')]
    stats = broadcaster.stats()
    assert (stats["malformed"], stats["skipped_own"], stats["received"]) == (1, 1, 1)


async def test_publishing_while_redis_is_gone_counts_failures_and_never_raises(
    pods: Pods, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="realtime")
    broadcaster, delivered = await pods.start(redis_server.url, "pod-a")
    redis_server.kill()
    await eventually(_is(broadcaster, LinkState.RECONNECTING))
    for n in range(50):
        send(broadcaster, message("general", n))
    assert len(delivered) == 50

    async def counted() -> bool:
        return broadcaster.stats()["publish_failures"] == 50

    await eventually(counted)
    assert sum("publishing to redis failed" in r.getMessage() for r in caplog.records) == 1
    redis_server.start()
    await eventually(_is(broadcaster, LinkState.CONNECTED))
    send(broadcaster, message("general", "back"))

    async def published() -> bool:
        return broadcaster.stats()["published"] == 1

    await eventually(published)
    assert any("publishing to redis works again" in r.getMessage() for r in caplog.records)


async def test_a_full_publish_queue_counts_failures_instead_of_growing(
    pods: Pods, redis_server: RedisServer
) -> None:
    delivered: Delivered = []
    broadcaster = RedisBackend(
        redis_server.url, pod_id="pod-a", channel_prefix=pods.prefix, publish_queue=10
    )
    pods.started.append(broadcaster)
    async with asyncio.timeout(5):
        await broadcaster.start(Handler(delivered))

    async def drained() -> bool:  # nothing queued (a heartbeat waits the flush delay)
        return broadcaster.stats()["publish_queue"] == 0

    await eventually(drained)
    for n in range(25):  # no await in between: the publisher cannot drain yet
        send(broadcaster, message(None, n))
    assert len(delivered) == 25
    assert broadcaster.stats()["publish_failures"] == 15
    assert broadcaster.stats()["publish_queue"] == 10


async def test_a_killed_link_is_rebuilt_resubscribed_and_carries_both_ways(
    pods: Pods, redis_server: RedisServer
) -> None:
    """One connection per pod carries commands and pub/sub: when Redis drops
    it, the pod reconnects, resubscribes, and publishing works again."""
    a, from_a = await pods.start(redis_server.url, "pod-a")
    b, from_b = await pods.start(redis_server.url, "pod-b")
    await wait_subscribed(b, 2)
    assert redis_server.command("CLIENT", "KILL", "TYPE", "pubsub") >= 2  # both links

    async def probes_get_through() -> bool:
        # a publish may die with the killed connection; a later one must not
        send(a, message(None, "to b"))
        send(b, message(None, "to a"))
        return any(orjson.loads(p)["data"] == "to b" for _, p in from_b) and any(
            orjson.loads(p)["data"] == "to a" for _, p in from_a
        )

    await eventually(probes_get_through)
    assert a.stats()["reconnects"] >= 1
    assert a.state is LinkState.CONNECTED
    names = redis_server.command("CLIENT", "LIST").decode()
    assert names.count("name=realtime:pod-a:link") == 1  # one connection for both


BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1]) * 1000000
return 1
"""


async def test_rooms_opened_and_closed_during_a_resubscribe_end_as_asked(
    pods: Pods, redis_server: RedisServer
) -> None:
    broadcaster, _ = await pods.start(redis_server.url, "pod-a")
    broadcaster.subscribe("kept")
    await wait_subscribed(broadcaster, 3)

    def kill_then_keep_busy() -> None:
        # one round trip: the subscriber is cut, then Redis is busy for 0.6 s,
        # so the resubscribe is in flight while the rooms change
        with redis_server.client() as client, client.pipeline(transaction=False) as pipe:
            pipe.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            pipe.execute_command("EVAL", BUSY, 0, "0.6")
            pipe.execute()

    busy = asyncio.create_task(asyncio.to_thread(kill_then_keep_busy))
    try:
        await eventually(_is(broadcaster, LinkState.RECONNECTING))
        broadcaster.subscribe("late")
        broadcaster.subscribe("gone")
        broadcaster.unsubscribe("gone")
        broadcaster.unsubscribe("kept")
    finally:
        async with asyncio.timeout(5):
            await busy
    await eventually(_is(broadcaster, LinkState.CONNECTED))
    room = f"{pods.prefix}:room:"

    async def as_asked() -> bool:
        return redis_server.channels(room + "*") == {room + "late"}

    await eventually(as_asked)
    await wait_subscribed(broadcaster, 3)


async def test_rediss_with_a_verified_certificate(pods: Pods) -> None:
    try:
        server = RedisServer(tls=True)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make certificates here: {exc}")
    try:
        try:
            server.start()
        except RuntimeError as exc:  # a redis-server built without TLS
            pytest.skip(f"no TLS Redis here: {exc}")
        a, _ = await pods.start(server.url, "pod-a")
        b, from_b = await pods.start(server.url, "pod-b")
        await wait_subscribed(b, 2)
        send(a, message(None, "over tls"))

        async def arrived() -> bool:
            return len(from_b) == 1

        await eventually(arrived)
    finally:
        for broadcaster in pods.started:
            async with asyncio.timeout(2):
                await broadcaster.stop()
        server.close()


async def appended(backend: RedisBackend, msg: Message, key: str | None = None) -> Stamp:
    """``backend.append`` awaited: the stamp (fails on any other outcome)."""
    got: asyncio.Future[Stamp | Unstored] = asyncio.get_running_loop().create_future()
    backend.append(msg, got.set_result, key=key)
    async with asyncio.timeout(5):
        outcome = await got
    assert isinstance(outcome, Stamp), outcome
    return outcome


def room_message(n: int) -> Message:
    return Message(id=f"m-{n}", room="r", sender=Identity("u1", "Ann"), ts=1, data=n)


async def test_offsets_continue_across_pods_that_saw_other_epochs_and_rooms_stored_before(
    pods: Pods, redis_server: RedisServer
) -> None:
    """The append script appends to the stream of the epoch the pod saw
    last, which gives the next offset: a pod that saw an epoch the room no
    longer has is corrected, rooms stored by the two earlier layouts (an
    ``offset`` field; ``o:<epoch>`` counters, IDs ``<offset>-0``) go on
    from their offsets with their history, and every write leaves the
    room's keys with a TTL (the hash's a little longer)."""
    a, _ = await pods.start(redis_server.url, "pod-a")
    b, _ = await pods.start(redis_server.url, "pod-b")
    a.subscribe("r")
    b.subscribe("r")
    await wait_subscribed(a, 3)
    await wait_subscribed(b, 3)
    base = f"{pods.prefix}:room:{{r}}"
    seq, legacy = f"{base}:seq", f"{base}:hist"

    def ids(key: str) -> list[bytes]:
        return [entry[0] for entry in redis_server.command("XRANGE", key, "-", "+")]

    def ttls_kept(hist: str) -> bool:
        return 0 < redis_server.command("PTTL", hist) < redis_server.command("PTTL", seq)

    first = await appended(a, room_message(1))
    assert first.offset == 1
    for n in range(2, 5):  # both pods have seen the room by now: the short path
        assert (await appended(b if n % 2 else a, room_message(n))).offset == n
    hist = f"{base}:hist:{first.epoch}"
    assert redis_server.command("HGETALL", seq) == {
        b"epoch": first.epoch.encode(),
        f"o:{first.epoch}".encode(): b"streams",
    }
    assert ids(hist) == [b"0-1", b"0-2", b"0-3", b"0-4"]
    assert ttls_kept(hist)
    # a pod of the previous version increments `o:<epoch>`: refused, so it
    # cannot move the room away behind this layout's back
    with pytest.raises(redis.exceptions.ResponseError, match="not an integer"):
        redis_server.command("HINCRBY", seq, f"o:{first.epoch}", 1)

    # the room moved to another epoch behind the pods' backs (its keys lost,
    # a new epoch stored, as an append creating the room leaves it), and
    # both pods still hold the old one as seen
    redis_server.command("DEL", seq, hist)
    redis_server.command("HSET", seq, "epoch", "00000000000000aa", "o:00000000000000aa", "streams")
    redis_server.command("XADD", f"{base}:hist:00000000000000aa", "0-9", "b", b'"data":9}')
    for key in (seq, f"{base}:hist:00000000000000aa"):
        redis_server.command("PEXPIRE", key, 3_600_000)
    moved = await appended(a, room_message(5))
    assert (moved.epoch, moved.offset) == ("00000000000000aa", 10)
    assert redis_server.command("EXISTS", hist) == 0  # nothing left under the old epoch

    # a room as the version before last stored it: `epoch` and `offset`
    redis_server.command("DEL", seq, f"{base}:hist:00000000000000aa")
    redis_server.command("HSET", seq, "epoch", "00000000000000bb", "offset", "41")
    redis_server.command("XADD", legacy, "41-0", "b", b'"room":"r","data":41}')
    for key in (seq, legacy):
        redis_server.command("PEXPIRE", key, 3_600_000)
    old = await appended(b, room_message(6))
    assert (old.epoch, old.offset) == ("00000000000000bb", 42)
    assert redis_server.command("HGETALL", seq) == {
        b"epoch": b"00000000000000bb",
        b"o:00000000000000bb": b"streams",
    }
    assert redis_server.command("EXISTS", legacy) == 0
    assert ids(f"{base}:hist:00000000000000bb") == [b"0-41", b"0-42"]
    assert ttls_kept(f"{base}:hist:00000000000000bb")
    got = await a.read("r", 40, 10)
    assert (got.epoch, got.newest, [e.offset for e in got.entries]) == (
        "00000000000000bb",
        42,
        [41, 42],
    )

    # and as the last version stored it: `o:<epoch>` counters, converted by
    # the first script that touches it (here a read), entries trimmed away
    # before the newest offset included
    redis_server.command("DEL", seq, f"{base}:hist:00000000000000bb")
    redis_server.command("HSET", seq, "epoch", "00000000000000cc", "o:00000000000000cc", "9")
    for n in (6, 7):
        redis_server.command("XADD", legacy, f"{n}-0", "b", f'"room":"r","data":{n}}}'.encode())
    for key in (seq, legacy):
        redis_server.command("PEXPIRE", key, 3_600_000)
    got = await b.read("r", 0, 10)
    assert (got.epoch, got.newest, got.first) == ("00000000000000cc", 9, 6)
    assert [e.offset for e in got.entries] == [6, 7]
    assert redis_server.command("EXISTS", legacy) == 0
    assert ttls_kept(f"{base}:hist:00000000000000cc")
    assert (await appended(a, room_message(7))).offset == 10

    # a room of the earlier layouts with no history entries left: its next
    # offset all the same
    redis_server.command("DEL", seq, f"{base}:hist:00000000000000cc")
    redis_server.command("HSET", seq, "epoch", "00000000000000dd", "offset", "5")
    redis_server.command("PEXPIRE", seq, 3_600_000)
    got = await b.read("r", 0, 10)
    assert (got.epoch, got.newest, list(got.entries)) == ("00000000000000dd", 5, [])
    assert (await appended(b, room_message(8))).offset == 6
    assert ids(f"{base}:hist:00000000000000dd") == [b"0-6"]
    assert ttls_kept(f"{base}:hist:00000000000000dd")


async def test_a_room_whose_stream_ran_out_before_its_hash_starts_a_new_epoch(
    pods: Pods, redis_server: RedisServer
) -> None:
    """The stream expires a second before the hash that names its epoch: in
    that second a read finds no room, and an append (from a pod that saw the
    old epoch or not) starts a new epoch at offset 1, never a stream the
    hash does not name."""
    a, _ = await pods.start(redis_server.url, "pod-a")
    b, _ = await pods.start(redis_server.url, "pod-b")
    a.subscribe("r")
    await wait_subscribed(a, 3)
    old = await appended(a, room_message(1))

    async def a_saw_it() -> bool:
        return a._seen.get("r") == (old.epoch, 1)

    await eventually(a_saw_it)
    base = f"{pods.prefix}:room:{{r}}"
    redis_server.command("DEL", f"{base}:hist:{old.epoch}")  # as at its expiry
    got = await b.read("r", 0, 10)
    assert (got.epoch, got.newest, list(got.entries)) == (None, 0, [])
    new = await appended(a, room_message(2))  # a saw the old epoch
    assert new.epoch != old.epoch
    assert new.offset == 1
    assert redis_server.command("HGET", f"{base}:seq", "epoch") == new.epoch.encode()
    assert redis_server.command("EXISTS", f"{base}:hist:{old.epoch}") == 0
    assert (await appended(b, room_message(3))).offset == 2  # b saw none


async def test_reads_never_reach_past_the_history_length_the_stream_may_exceed(
    pods: Pods, redis_server: RedisServer
) -> None:
    """Redis trims a room's stream a node of entries at a time, so it may
    hold more than the history length; what a read returns, and the
    ``first`` it reports, stop at the history length all the same."""
    a, _ = await pods.start(redis_server.url, "pod-a", history_length=5)
    for n in range(1, 13):
        stamp = await appended(a, room_message(n))
    hist = f"{pods.prefix}:room:{{r}}:hist:{stamp.epoch}"
    assert redis_server.command("XLEN", hist) > 5  # kept by Redis, never read
    for after, limit in ((0, 100), (2, 100), (-1, 100), (-1, 3), (9, 100)):
        got = await a.read("r", after, limit)
        offsets = [e.offset for e in got.entries]
        assert (got.newest, got.first) == (12, 8), (after, limit)
        want = {0: [8, 9, 10, 11, 12], 2: [8, 9, 10, 11, 12], 9: [10, 11, 12]}.get(after)
        assert offsets == (want if want is not None else list(range(max(8, 13 - limit), 13))), (
            after,
            limit,
        )


@pytest.mark.parametrize(("delay", "calls"), [(0.0, 2), (0.5, 1)])
async def test_an_idle_pod_waits_the_flush_delay_so_what_follows_shares_the_call(
    pods: Pods, redis_server: RedisServer, delay: float, calls: int
) -> None:
    """A message that finds the publisher idle waits ``flush_delay``; one
    queued a moment later goes in the same script call. Without the delay
    the first is written at once and the second needs a call of its own."""
    a, _ = await pods.start(redis_server.url, "pod-a", flush_delay=delay)
    await appended(a, room_message(0))  # the scripts loaded (a new Redis has none)
    redis_server.command("CONFIG", "RESETSTAT")
    outcomes: list[Stamp | Unstored] = []
    before = a.stats()
    a.append(room_message(1), outcomes.append)

    async def taken() -> bool:  # the publisher woke up and wrote it, or started waiting
        now = a.stats()
        return any(now[k] != before[k] for k in ("batches", "flush_waits"))

    await eventually(taken, timeout=5)
    a.append(room_message(2), outcomes.append)

    async def both_stored() -> bool:
        return len(outcomes) == 2

    await eventually(both_stored, timeout=5)
    assert [o.offset for o in outcomes if isinstance(o, Stamp)] == [2, 3]
    stats = redis_server.command("INFO", "commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == calls, {k: v["calls"] for k, v in stats.items()}


@pytest.mark.parametrize(("delay", "calls"), [(0.0, 3), (0.5, 2)])
async def test_what_queues_behind_a_batch_waits_the_flush_delay_from_its_write(
    pods: Pods, redis_server: RedisServer, delay: float, calls: int
) -> None:
    """A message queued while a batch is in flight goes once the flush
    delay has passed since that batch's write, not as soon as its reply
    comes: one queued after the reply (within the delay) joins it, in one
    script call. Without the delay each goes in a call of its own."""
    a = RedisBackend(
        redis_server.url,
        pod_id="pod-a",
        channel_prefix=pods.prefix,
        heartbeat_interval=2.0,  # its heartbeats stay out of the way
        heartbeat_timeout=5.0,
        flush_delay=delay,
    )
    pods.started.append(a)
    async with asyncio.timeout(5):
        await a.start(Handler([]))
    await appended(a, room_message(0), key="k0")  # the scripts loaded
    (shard,) = a._shards.values()
    publisher = shard.publisher

    async def quiet() -> bool:  # nothing written for twice the delay: the next is sparse
        loop = asyncio.get_running_loop()
        return not publisher.queued and loop.time() - publisher._last_write > 2 * delay + 0.01

    await eventually(quiet, timeout=5)
    redis_server.command("CONFIG", "RESETSTAT")
    outcomes: list[Stamp | Unstored] = []
    redis_server.pause()  # the first batch's reply waits until resumed
    try:
        a.append(room_message(1), outcomes.append, key="k1")  # written at once

        async def written() -> bool:
            return not publisher.queued

        await eventually(written, timeout=5)
        a.append(room_message(2), outcomes.append, key="k2")  # behind the batch in flight
    finally:
        redis_server.resume()

    async def done(count: int) -> bool:
        return len(outcomes) >= count

    await eventually(lambda: done(1), timeout=5)  # the first batch's reply
    a.append(room_message(3), outcomes.append, key="k3")  # within the delay of its write
    await eventually(lambda: done(3), timeout=5)
    assert [o.offset for o in outcomes if isinstance(o, Stamp)] == [2, 3, 4]
    stats = redis_server.command("INFO", "commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == calls, {k: v["calls"] for k, v in stats.items()}


async def test_sparse_traffic_does_not_wait_the_flush_delay(
    pods: Pods, redis_server: RedisServer
) -> None:
    """The flush delay is for dense traffic: a message that comes longer
    than the delay after the last write goes at once."""
    a = RedisBackend(
        redis_server.url,
        pod_id="pod-a",
        channel_prefix=pods.prefix,
        heartbeat_interval=2.0,
        heartbeat_timeout=5.0,
        flush_delay=0.05,
    )
    pods.started.append(a)
    async with asyncio.timeout(5):
        await a.start(Handler([]))
    await appended(a, room_message(1))
    shard = next(iter(a._shards.values()))  # one primary

    async def quiet() -> bool:  # nothing written for twice the delay
        loop = asyncio.get_running_loop()
        return loop.time() - shard.publisher._last_write > 0.1 and not shard.publisher.queued

    await eventually(quiet, timeout=3)
    waits = a.stats()["flush_waits"]
    await appended(a, room_message(2))
    assert a.stats()["flush_waits"] == waits
    # and dense traffic waits: right after that write, another one does
    await appended(a, room_message(3))
    assert a.stats()["flush_waits"] == waits + 1


@pytest.mark.parametrize("subscribed", [False, True])
async def test_traffic_keeps_a_rooms_keys_alive_the_pod_refreshing_their_ttls(
    pods: Pods, redis_server: RedisServer, subscribed: bool
) -> None:
    """The pod has a room's TTLs refreshed once an eighth of them has passed
    since it last did: the keys of a room that keeps getting messages never
    run out, and a message sooner than that does not touch them. By the
    script, or (a room the pod is subscribed to, after its first append) by
    two PEXPIREs beside the plain XADD."""
    a = RedisBackend(redis_server.url, pod_id="pod-a", channel_prefix=pods.prefix, history_ttl=4.0)
    pods.started.append(a)
    async with asyncio.timeout(5):
        await a.start(Handler([]))
    if subscribed:
        a.subscribe("r")
        await wait_subscribed(a, 3)
    seq, hist = f"{pods.prefix}:room:{{r}}:seq", f"{pods.prefix}:room:{{r}}:hist"
    hist += ":" + (await appended(a, room_message(1))).epoch
    redis_server.command("CONFIG", "RESETSTAT")
    await appended(a, room_message(2))  # within an eighth (0.5 s): no refresh
    assert "cmdstat_pexpire" not in redis_server.command("INFO", "commandstats")
    first = redis_server.command("PTTL", hist)
    assert 3000 < first <= 4000
    assert 4000 < redis_server.command("PTTL", seq) <= 5000  # the hash outlives its stream

    async def an_eighth_gone() -> bool:
        return redis_server.command("PTTL", hist) < 3400

    await eventually(an_eighth_gone, timeout=5)
    await appended(a, room_message(3))
    assert all(redis_server.command("PTTL", k) > 3600 for k in (seq, hist))
    assert 4000 < redis_server.command("PTTL", seq) <= 5000
    assert a.stats()["plain_appends"] == (2 if subscribed else 0)


async def test_a_room_redis_set_back_moves_to_a_new_epoch_and_keeps_its_ttls(
    pods: Pods, redis_server: RedisServer
) -> None:
    """A read that finds Redis behind what the pod saw (writes lost) moves
    the room to a new epoch above that offset; its keys keep their TTLs,
    and the next message goes on above the offsets the pod's members saw."""
    a, _ = await pods.start(redis_server.url, "pod-a")
    a.subscribe("r")
    await wait_subscribed(a, 3)
    seq, hist = f"{pods.prefix}:room:{{r}}:seq", f"{pods.prefix}:room:{{r}}:hist"
    stamps = [await appended(a, room_message(n)) for n in range(1, 4)]
    epoch = stamps[0].epoch

    async def seen_all() -> bool:  # the pod saw its own three on the channel
        got = await a.read("r", 0, 10)
        return got.newest == 3

    await eventually(seen_all)
    # Redis lost the last two writes: the stream as it was after the first
    ttl = redis_server.command("PTTL", f"{hist}:{epoch}")
    redis_server.command("DEL", f"{hist}:{epoch}")
    redis_server.command("XADD", f"{hist}:{epoch}", "0-1", "b", b'"data":1}')
    redis_server.command("PEXPIRE", f"{hist}:{epoch}", ttl)
    got = await a.read("r", 0, 10)
    assert got.epoch != epoch
    assert (got.newest, list(got.entries)) == (3, [])
    assert a.stats()["rewinds"] == 1
    assert redis_server.command("EXISTS", f"{hist}:{epoch}") == 0
    assert all(redis_server.command("PTTL", k) > 0 for k in (seq, f"{hist}:{got.epoch}"))
    after = await appended(a, room_message(4))
    assert (after.epoch, after.offset) == (got.epoch, 4)


async def test_an_append_that_finds_redis_set_back_moves_the_room_to_a_new_epoch(
    pods: Pods, redis_server: RedisServer
) -> None:
    """The append script itself checks the offset the stream gives against
    what the pod saw: behind it (writes lost), the message opens a new
    epoch above the seen offset, and the old epoch's stream is gone, so no
    offset ever names two messages."""
    a, _ = await pods.start(redis_server.url, "pod-a")
    a.subscribe("r")
    await wait_subscribed(a, 3)
    stamps = [await appended(a, room_message(n)) for n in range(1, 4)]
    hist = f"{pods.prefix}:room:{{r}}:hist:{stamps[0].epoch}"

    async def seen_all() -> bool:  # the pod saw its own three on the channel
        return a._seen.get("r") == (stamps[0].epoch, 3)

    await eventually(seen_all)
    redis_server.command("XTRIM", hist, "MAXLEN", "0")
    redis_server.command("XSETID", hist, "0-1")  # as if only the first were stored
    after = await appended(a, room_message(4))
    assert after.epoch != stamps[0].epoch
    assert after.offset == 4
    assert redis_server.command("EXISTS", hist) == 0
    got = await a.read("r", 0, 10)
    assert (got.epoch, got.newest, [e.offset for e in got.entries]) == (after.epoch, 4, [4])


# -- plain appends: the script's common case as XADD, then PUBLISH ------------


async def _in_room_r(
    pods: Pods, url_a: str, url_b: str
) -> tuple[RedisBackend, RedisBackend, Delivered]:
    """Pods a and b (on those Redis URLs) subscribed to room ``r``; what b gets."""
    a, _ = await pods.start(url_a, "pod-a")
    b, got_b = await pods.start(url_b, "pod-b")
    for pod in (a, b):
        pod.subscribe("r")
        await wait_subscribed(pod, 3)
    return a, b, got_b


async def _verified(
    a: RedisBackend, others: list[Delivered], redis_server: RedisServer
) -> tuple[str, str]:
    """Room ``r`` with message 1 appended by ``a`` (through the script: the
    room's first on this connection) and seen by every pod; its epoch and
    its history stream."""
    first = await appended(a, room_message(1))

    async def everyone_has_it() -> bool:
        return a._seen.get("r") == (first.epoch, 1) and all(
            any(b'"data":1' in payload for _, payload in got) for got in others
        )

    await eventually(everyone_has_it)
    return first.epoch, f"{a.names.log_keys('r')[1]}:{first.epoch}"


def _calls(redis_server: RedisServer) -> dict[str, int]:
    stats = redis_server.command("INFO", "commandstats")
    return {name[len("cmdstat_") :]: value["calls"] for name, value in stats.items()}


def _offsets(got: Delivered) -> list[int]:
    """The offsets of the room messages delivered (presence events have none)."""
    frames = [orjson.loads(payload) for _, payload in got]
    return [f["offset"] for f in frames if f["type"] == "message"]


async def test_a_verified_room_is_appended_with_plain_xadds_until_the_connection_changes(
    pods: Pods, redis_server: RedisServer
) -> None:
    """A room's first append on a connection goes through the script (it
    checks Redis is not behind what the pod saw); the next ones, on the same
    connection, are plain XADDs then PUBLISHes, which cost Redis about half
    as much; so are a room's appends by a pod whose newest offset seen came
    in a push on its connection. Keyed appends always take the script; so
    does the first append on a new connection."""
    a, b, got_b = await _in_room_r(pods, redis_server.url, redis_server.url)
    epoch, hist = await _verified(a, [got_b], redis_server)
    redis_server.command("CONFIG", "RESETSTAT")
    stamps = [await appended(a, room_message(n)) for n in range(2, 6)]
    assert [(s.epoch, s.offset) for s in stamps] == [(epoch, n) for n in range(2, 6)]
    calls = _calls(redis_server)
    assert "evalsha" not in calls, calls
    assert calls["xadd"] == 4
    assert a.stats()["plain_appends"] == 4
    await eventually(lambda: _async(_offsets(got_b) == [1, 2, 3, 4, 5]))
    assert redis_server.command("XLEN", hist) == 5
    # pod b never appended here, but the newest offset it saw came in a push
    # on its connection: that Redis is not behind it, no script needed
    assert (await appended(b, room_message(51))).offset == 6
    assert b.stats()["plain_appends"] == 1
    await eventually(lambda: _async(a._seen.get("r") == (epoch, 6)))

    redis_server.command("CONFIG", "RESETSTAT")
    keyed = await appended(a, room_message(6), key="k6")
    assert (keyed.offset, _calls(redis_server)["evalsha"]) == (7, 1)

    # a new connection: the room is verified again by its first append there
    reconnects = [pod.stats()["reconnects"] for pod in (a, b)]
    redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")

    async def reconnected() -> bool:  # both: pod b must be there to get 7 and 8
        return all(
            pod.stats()["reconnects"] > before and pod.stats()["subscribed_channels"] == 3
            for pod, before in zip((a, b), reconnects, strict=True)
        )

    await eventually(reconnected)
    plain = a.stats()["plain_appends"]
    stamps = [await appended(a, room_message(n)) for n in (7, 8)]
    assert [s.offset for s in stamps] == [8, 9]
    assert a.stats()["plain_appends"] == plain + 1  # 8, not 7
    await eventually(lambda: _async(_offsets(got_b)[-2:] == [8, 9]))


async def _async(value: bool) -> bool:
    return value


async def test_a_publish_lost_with_the_connection_is_sent_again_on_the_next(
    pods: Pods, redis_server: RedisServer
) -> None:
    """The plain XADD stored the message (and the sender has its ack), then
    the connection went before Redis had its PUBLISH: the pod publishes it
    again once it is connected again, so the other pods get it even in a
    room that stays quiet. Stored once."""
    cutter = await ReplyCutter(redis_server.port).start()
    try:
        a, _, got_b = await _in_room_r(pods, cutter.url, redis_server.url)
        epoch, hist = await _verified(a, [got_b], redis_server)
        cutter.arm(b"\n2:%s\n" % epoch.encode(), swallow=True)  # the PUBLISH's envelope
        stamp = await appended(a, room_message(2))
        assert (stamp.epoch, stamp.offset) == (epoch, 2)
        await eventually(lambda: _async(cutter.cut == 1))
        await eventually(lambda: _async(_offsets(got_b) == [1, 2]), timeout=5)
        assert a.stats()["resent"] == 1
        assert redis_server.command("XLEN", hist) == 2
    finally:
        await cutter.stop()


async def test_a_plain_append_is_delivered_on_its_pod_from_the_reply_with_its_ack(
    pods: Pods, redis_server: RedisServer
) -> None:
    """A plain append's own copy is delivered on its pod when the XADD's
    reply gives the offset, in the same step as its ``done`` and with the
    pod's writes to clients held (the sender's copy and its ack go in one
    write), not a round trip later, when its PUBLISH comes back as a push
    (a pod's sequencer drops that copy). Here the PUBLISH never reaches
    Redis: pod a has the message all the same, pod b does not."""
    cutter = await ReplyCutter(redis_server.port).start()
    try:
        a, got_a = await pods.start(cutter.url, "pod-a")
        b, got_b = await pods.start(redis_server.url, "pod-b")
        for pod in (a, b):
            pod.subscribe("r")
            await wait_subscribed(pod, 3)
        epoch, _ = await _verified(a, [got_a, got_b], redis_server)
        cutter.arm(b"\n2:%s\n" % epoch.encode(), drop=True)  # the PUBLISH's envelope
        seen_at_done: list[tuple[list[int], bool]] = []
        done: asyncio.Future[Stamp | Unstored] = asyncio.get_running_loop().create_future()

        def stamped(outcome: Stamp | Unstored) -> None:
            seen_at_done.append((_offsets(got_a), holding_writes.connections is not None))
            done.set_result(outcome)

        a.append(room_message(2), stamped)
        async with asyncio.timeout(5):
            stamp = await done
        assert isinstance(stamp, Stamp)
        assert (stamp.epoch, stamp.offset) == (epoch, 2)
        assert a.stats()["plain_appends"] == 1
        assert seen_at_done == [([1, 2], True)]
        await eventually(lambda: _async(cutter.cut == 1))
        assert _offsets(got_b) == [1]
    finally:
        await cutter.stop()


async def test_a_plain_appends_own_push_is_skipped_unread_by_its_pod(
    pods: Pods, redis_server: RedisServer
) -> None:
    """Delivered from the reply, a plain append comes back to its pod as a
    push (``<pod> r`` heads its envelope) that is skipped unread: the pod's
    sequencer never sees it twice; other pods deliver it as any entry."""
    a, got_a = await pods.start(redis_server.url, "pod-a")
    b, got_b = await pods.start(redis_server.url, "pod-b")
    for pod in (a, b):
        pod.subscribe("r")
        await wait_subscribed(pod, 3)
    await _verified(a, [got_a, got_b], redis_server)
    skipped = a.stats()["skipped_own"]
    for n in (2, 3):
        await appended(a, room_message(n))
    assert a.stats()["plain_appends"] == 2
    await eventually(lambda: _async(_offsets(got_b) == [1, 2, 3]))
    await eventually(lambda: _async(a.stats()["skipped_own"] == skipped + 2))
    assert _offsets(got_a) == [1, 2, 3]


def test_a_pod_id_with_white_space_is_refused() -> None:
    """The envelope's first line is the pod id, and ``<pod> r`` marks the
    entries a pod delivered from the reply: a space in an id would make
    one pod's mark another pod's name."""
    with pytest.raises(ValueError, match="white space"):
        RedisBackend("redis://127.0.0.1:1/0", pod_id="pod r")


async def test_a_pod_that_died_before_its_publish_has_the_rooms_tail_published_when_pruned(
    pods: Pods, redis_server: RedisServer
) -> None:
    """The plain XADD stored the message, and the pod died before its
    PUBLISH reached Redis: the pod that prunes it from the room's presence
    publishes the room's last entries again, in the dead pod's name, so a
    room that stays quiet still gets it. Pods drop the offsets they have."""
    cutter = await ReplyCutter(redis_server.port).start()
    try:
        a, b, got_b = await _in_room_r(pods, cutter.url, redis_server.url)
        ttl = 0.5
        presence_a, presence_b = a.presence(ttl), b.presence(ttl)
        await presence_a.update("r", [Member("u1", "Ann", 1)], [])
        await presence_b.update("r", [Member("u2", "Bob", 2)], [])
        epoch, _ = await _verified(a, [got_b], redis_server)
        cutter.arm(b"\n2:%s\n" % epoch.encode(), drop=True)  # then pod a says nothing more
        stamp = await appended(a, room_message(2))
        await eventually(lambda: _async(cutter.cut == 1))
        await a.stop()  # dead: nothing of it reaches Redis again
        assert stamp.offset == 2
        assert _offsets(got_b) == [1]
        pruned: list[tuple[str, bytes]] = []

        async def a_pruned() -> bool:
            pruned.extend(await presence_b.refresh(["r"]))
            return bool(pruned)

        await eventually(a_pruned, timeout=5)
        assert b'"member_left"' in pruned[0][1]
        await eventually(lambda: _async(2 in _offsets(got_b)), timeout=5)
        # the tail, oldest first: 1 again (a pod's sequencer drops it), then 2
        assert _offsets(got_b) == [1, 1, 2]
    finally:
        await cutter.stop()
