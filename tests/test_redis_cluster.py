"""Several real pods sharing one real redis-server, and Redis broken on purpose.

Every test starts its own redis-server on a free port and its pods with a
channel prefix of their own, short heartbeats and short backoff, so that
failures are detected and healed within a second or two.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer, TlsUnsupported, free_port
from .support import Pod, connect, eventually, get_json, recv_type, send

pytestmark = pytest.mark.slow

DIRTY = re.compile(r"Task was destroyed|[Uu]nclosed|ResourceWarning|Traceback|never awaited")


def start_cluster(
    pod_factory: PodFactory, redis: RedisServer | str, prefix: str, count: int
) -> list[Pod]:
    url = redis if isinstance(redis, str) else redis.url
    return [pod_factory(redis_pod_env(url, prefix), name=f"pod{i + 1}") for i in range(count)]


async def link_up(session: aiohttp.ClientSession, pod: Pod) -> bool:
    body = await get_json(session, f"{pod.base}/readyz")
    return bool(body["link_up"])


async def broadcaster_stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    stats = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return dict(stats["broadcaster"])


async def wait_numsub(redis: RedisServer, channel: str, count: int, timeout: float = 10) -> None:
    async def check() -> bool:
        return redis.numsub(channel) == count

    await eventually(check, timeout=timeout)


async def wait_links(
    session: aiohttp.ClientSession, pods: list[Pod], up: bool, timeout: float = 10
) -> None:
    async def check() -> bool:
        states = [await link_up(session, pod) for pod in pods]
        return all(state is up for state in states)

    await eventually(check, timeout=timeout)


async def messages(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    return [await recv_type(ws, "message") for _ in range(count)]


def assert_clean_exit(pod: Pod) -> None:
    assert pod.stop() == 0, pod.log
    assert not DIRTY.search(pod.log), pod.log


@pytest.mark.parametrize("count", [2, 3])
async def test_every_pod_reaches_every_pod_in_rooms_and_globally_exactly_once(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
    count: int,
) -> None:
    pods = start_cluster(pod_factory, redis_server, channel_prefix, count)
    rooms = [(await connect(session, pod.ws_url("general")))[0] for pod in pods]
    everyone = [(await connect(session, pod.ws_url()))[0] for pod in pods]
    await wait_numsub(redis_server, f"{channel_prefix}:room:general", count)
    await wait_numsub(redis_server, f"{channel_prefix}:global", count)

    for i, ws in enumerate(rooms):
        await send(ws, {"type": "message", "data": f"room from pod{i + 1}"})
    for i, ws in enumerate(everyone):
        await send(ws, {"type": "message", "data": f"global from pod{i + 1}"})
    # a final round from pod1: once it has arrived, any duplicate would have too
    await send(rooms[0], {"type": "message", "data": "room end"})
    await send(everyone[0], {"type": "message", "data": "global end"})

    room_texts = {f"room from pod{i + 1}" for i in range(count)}
    global_texts = {f"global from pod{i + 1}" for i in range(count)}
    ids: dict[str, set[str]] = {}
    for ws in rooms:  # room members are connections too: they get global messages
        frames = await messages(ws, 2 * count + 2)
        got = Counter(m["data"] for m in frames)
        assert got == Counter(room_texts | global_texts | {"room end", "global end"})
        for m in frames:
            ids.setdefault(m["data"], set()).add(m["id"])
    for ws in everyone:
        frames = await messages(ws, count + 1)
        got = Counter(m["data"] for m in frames)
        assert got == Counter(global_texts | {"global end"})
        for m in frames:
            ids.setdefault(m["data"], set()).add(m["id"])
    # One id per message on every pod, and no two messages share one.
    assert all(len(seen) == 1 for seen in ids.values()), ids
    assert len(set().union(*ids.values())) == len(ids)

    for pod in pods:
        own_globals = 2 if pod is pods[0] else 1

        async def all_came_back(pod: Pod = pod, own_globals: int = own_globals) -> bool:
            stats = await broadcaster_stats(session, pod)
            # its own pushes skipped: room-less messages and plain appends
            skipped = own_globals + stats["plain_appends"]
            return stats["skipped_own"] == skipped  # type: ignore[no-any-return]

        await eventually(all_came_back)
        stats = await broadcaster_stats(session, pod)
        assert stats["pod"] == pod.name
        assert stats["state"] == "connected"
        assert stats["published"] == own_globals + (2 if pod is pods[0] else 1)
        # Every message reaches every pod once: room entries, its own too, are
        # delivered as Redis stamped them (the room's order is Redis's), from
        # their push or, a plain append on its own pod, from the XADD's reply
        # (its push then skipped); its own room-less messages were delivered
        # when sent, so their echo is skipped.
        plain = stats["plain_appends"]
        assert stats["received"] == 2 * (count + 1) - own_globals - plain
        assert stats["publish_failures"] == 0
    for ws in rooms + everyone:
        await ws.close()
    for pod in pods:
        assert_clean_exit(pod)
    assert not redis_server.channels(f"{channel_prefix}:*")


async def test_a_room_is_subscribed_only_on_pods_hosting_it(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pod1, pod2 = start_cluster(pod_factory, redis_server, channel_prefix, 2)
    room = f"{channel_prefix}:room:"
    a, _ = await connect(session, pod1.ws_url("alpha"))
    b, _ = await connect(session, pod2.ws_url("beta"))
    await wait_numsub(redis_server, room + "alpha", 1)
    await wait_numsub(redis_server, room + "beta", 1)
    assert redis_server.channels(room + "*") == {room + "alpha", room + "beta"}

    # join/leave racing the (un)subscribe in flight: the last word wins
    for n in range(20):
        await send(a, {"type": "join", "room": "gamma", "ref": n})
        await send(a, {"type": "leave", "room": "gamma", "ref": n})
    await send(a, {"type": "join", "room": "delta"})
    await send(a, {"type": "leave", "room": "delta"})
    await send(a, {"type": "join", "room": "delta", "ref": "last"})
    while (await recv_type(a, "joined")).get("ref") != "last":
        pass
    await wait_numsub(redis_server, room + "delta", 1)
    assert redis_server.numsub(room + "gamma") == 0

    await a.close()  # alpha's last member leaves pod1
    await wait_numsub(redis_server, room + "alpha", 0)
    await wait_numsub(redis_server, room + "delta", 0)
    assert redis_server.channels(room + "*") == {room + "beta"}
    await b.close()
    await wait_numsub(redis_server, room + "beta", 0)


async def test_redis_killed_during_traffic_then_restarted_on_the_same_port(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pod1, pod2 = start_cluster(pod_factory, redis_server, channel_prefix, 2)
    sender, _ = await connect(session, pod1.ws_url("general"))
    local, _ = await connect(session, pod1.ws_url("general"))
    remote, _ = await connect(session, pod2.ws_url("general"))
    await wait_numsub(redis_server, f"{channel_prefix}:room:general", 2)
    await send(sender, {"type": "message", "data": "before"})
    assert (await recv_type(remote, "message"))["data"] == "before"

    redis_server.kill()
    for n in range(20):  # traffic during the outage: local members still get all of it
        await send(sender, {"type": "message", "data": f"during {n}"})
    assert [m["data"] for m in await messages(local, 21)][1:] == [f"during {n}" for n in range(20)]
    await wait_links(session, [pod1, pod2], up=False)
    stats = await broadcaster_stats(session, pod1)
    assert stats["state"] == "reconnecting"
    assert stats["publish_failures"] >= 1
    ready = await get_json(session, f"{pod1.base}/readyz")
    assert ready["ready"] is True  # still serving its local clients
    assert ready["broadcaster"] == "reconnecting"

    started = time.monotonic()
    redis_server.start()
    await wait_links(session, [pod1, pod2], up=True)
    await wait_numsub(redis_server, f"{channel_prefix}:room:general", 2)
    await send(sender, {"type": "message", "data": "after"})
    received = await recv_type(remote, "message")
    while received["data"] != "after":  # nothing from the outage reached it
        assert not received["data"].startswith("during"), received
        received = await recv_type(remote, "message")
    assert time.monotonic() - started < 10
    for pod in (pod1, pod2):
        stats = await broadcaster_stats(session, pod)
        assert stats["reconnects"] >= 1
        assert pod.log.count("redis link lost") == 1, pod.log
        assert len(re.findall(r"publishing to redis failed", pod.log)) <= 1, pod.log
        pod.wait_for_log("redis link resubscribed")
    for ws in (sender, local, remote):
        await ws.close()
    for pod in (pod1, pod2):
        assert_clean_exit(pod)


async def test_client_kill_type_pubsub_is_healed_by_resubscribing(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pod1, pod2 = start_cluster(pod_factory, redis_server, channel_prefix, 2)
    a, _ = await connect(session, pod1.ws_url("general"))
    b, _ = await connect(session, pod2.ws_url("general"))
    channel = f"{channel_prefix}:room:general"
    await wait_numsub(redis_server, channel, 2)

    assert redis_server.kill_pubsub_clients() == 2
    for pod in (pod1, pod2):
        pod.wait_for_log("redis link resubscribed")
    await wait_numsub(redis_server, channel, 2)
    await send(a, {"type": "message", "data": "from 1"})
    await send(b, {"type": "message", "data": "from 2"})
    for ws in (a, b):
        assert {m["data"] for m in await messages(ws, 2)} == {"from 1", "from 2"}
    await a.close()
    await b.close()
    for pod in (pod1, pod2):
        assert (await broadcaster_stats(session, pod))["reconnects"] >= 1
        assert_clean_exit(pod)


async def test_a_stalled_redis_is_detected_reported_and_healed(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pod1, pod2 = start_cluster(pod_factory, redis_server, channel_prefix, 2)
    a, _ = await connect(session, pod1.ws_url("general"))
    b, _ = await connect(session, pod2.ws_url("general"))
    channel = f"{channel_prefix}:room:general"
    await wait_numsub(redis_server, channel, 2)

    redis_server.pause()  # SIGSTOP: sockets stay open, nothing is answered
    try:
        await wait_links(session, [pod1, pod2], up=False, timeout=10)
        for pod in (pod1, pod2):
            pod.wait_for_log("did not answer in time")
            assert (await broadcaster_stats(session, pod))["heartbeat_timeouts"] >= 1
        await send(a, {"type": "message", "data": "local during stall"})
        assert (await recv_type(a, "message"))["data"] == "local during stall"
    finally:
        redis_server.resume()
    await wait_links(session, [pod1, pod2], up=True, timeout=15)
    await wait_numsub(redis_server, channel, 2)
    await send(b, {"type": "message", "data": "healed"})
    received = await recv_type(a, "message")
    while received["data"] != "healed":
        received = await recv_type(a, "message")
    for pod in (pod1, pod2):
        stats = await broadcaster_stats(session, pod)
        assert stats["reconnects"] >= 1
        assert stats["last_heartbeat_age"] is not None
        assert stats["last_heartbeat_age"] < 2.0
    await a.close()
    await b.close()
    for pod in (pod1, pod2):
        assert_clean_exit(pod)


async def test_a_pod_started_while_redis_is_down_joins_once_it_starts(
    pod_factory: PodFactory,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    redis_server = RedisServer()
    redis_server.port = free_port()
    try:
        pod1, pod2 = start_cluster(pod_factory, redis_server, channel_prefix, 2)
        for pod in (pod1, pod2):
            pod.wait_for_log("redis unreachable")
            ready = await get_json(session, f"{pod.base}/readyz")
            assert ready == {
                "ready": True,
                "draining": False,
                "broadcaster": "connecting",
                "link_up": False,
            }
            stats = await broadcaster_stats(session, pod)
            assert stats["state"] == "connecting"
            assert stats["connect_failures"] >= 1
        # local delivery works without Redis
        a, _ = await connect(session, pod1.ws_url("general"))
        b, _ = await connect(session, pod2.ws_url("general"))
        await send(a, {"type": "message", "data": "alone"})
        assert (await recv_type(a, "message"))["data"] == "alone"

        redis_server.start()
        await wait_links(session, [pod1, pod2], up=True)
        await wait_numsub(redis_server, f"{channel_prefix}:room:general", 2)
        await send(a, {"type": "message", "data": "together"})
        assert (await recv_type(b, "message"))["data"] == "together"
        for pod in (pod1, pod2):
            pod.wait_for_log("redis link connected")
        await a.close()
        await b.close()
        for pod in (pod1, pod2):
            assert_clean_exit(pod)
    finally:
        redis_server.close()


async def test_the_password_never_reaches_logs_stats_or_readyz(
    pod_factory: PodFactory, channel_prefix: str, session: aiohttp.ClientSession
) -> None:
    secret = "s3cret-pa55word"
    redis_server = RedisServer(password=secret).start()
    try:
        pod = start_cluster(pod_factory, redis_server, channel_prefix, 1)[0]
        await wait_links(session, [pod], up=True)
        for path in ("/readyz", "/api/chat-api/ws/stats"):
            async with asyncio.timeout(10), session.get(pod.base + path) as resp:
                assert resp.status == 200
                text = await resp.text()
            assert secret not in text
            assert "redis://" not in text  # no URL at all
            assert f"127.0.0.1:{redis_server.port}" not in text
        stats = await broadcaster_stats(session, pod)
        assert (stats["kind"], stats["state"]) == ("redis", "connected")
        assert "***" in pod.log  # the URL was logged, redacted
        assert_clean_exit(pod)
        assert secret not in pod.log
    finally:
        redis_server.close()


async def test_shutdown_closes_every_redis_connection(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pod = start_cluster(pod_factory, redis_server, channel_prefix, 1)[0]
    ws, _ = await connect(session, pod.ws_url("general"))
    await send(ws, {"type": "message", "data": "hi"})
    await recv_type(ws, "message")
    names = redis_server.command("CLIENT", "LIST").decode()
    assert f"name=chat-api:{pod.name}:link" in names
    assert_clean_exit(pod)
    await ws.close()

    async def gone() -> bool:
        return "chat-api:" not in redis_server.command("CLIENT", "LIST").decode()

    await eventually(gone)
    assert redis_server.numsub(f"{channel_prefix}:global") == 0


async def test_many_messages_across_pods_keep_each_senders_order(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    # 500 frames at full speed from one client: the rate limit is off.
    pod1, pod2 = (
        pod_factory(
            {**redis_pod_env(redis_server.url, channel_prefix), "RATE_LIMIT_PER_SECOND": "0"},
            name=name,
        )
        for name in ("pod1", "pod2")
    )
    sender, _ = await connect(session, pod1.ws_url("general"))
    receiver, _ = await connect(session, pod2.ws_url("general"))
    await wait_numsub(redis_server, f"{channel_prefix}:room:general", 2)
    count = 500
    async with asyncio.timeout(20):
        for n in range(count):
            await send(sender, {"type": "message", "data": n})
        got = [m["data"] for m in await messages(receiver, count)]
    assert got == list(range(count))
    await sender.close()
    await receiver.close()


async def test_the_broadcaster_block_and_envelopes_that_are_not_ours(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pod = start_cluster(pod_factory, redis_server, channel_prefix, 1)[0]
    ws, _ = await connect(session, pod.ws_url("general"))
    await wait_numsub(redis_server, f"{channel_prefix}:room:general", 1)

    async def all_subscribed() -> bool:  # the global one, its heartbeat, the room
        stats = await broadcaster_stats(session, pod)
        return bool(stats["subscribed_channels"] == stats["wanted_channels"] == 3)

    await eventually(all_subscribed)
    stats = await broadcaster_stats(session, pod)
    assert set(stats) >= {
        "kind", "state", "pod", "channel_prefix", "published", "received", "skipped_own",
        "malformed", "publish_failures", "publish_queue", "reconnects", "connect_failures",
        "heartbeat_timeouts", "last_heartbeat_age", "subscribed_channels", "wanted_channels",
        "appended", "append_failures", "history_reads",
    }  # fmt: skip
    assert (stats["kind"], stats["pod"], stats["channel_prefix"]) == (
        "redis",
        pod.name,
        channel_prefix,
    )
    assert int(redis_server.command("PUBSUB", "NUMPAT")) == 0  # never PSUBSCRIBE

    # Whatever else is published on our channels is skipped and counted.
    for channel in ("room:general", "global"):
        for junk in (b"not an envelope", b'{"pod": "elsewhere"}', b"\xff\x00"):
            redis_server.command("PUBLISH", f"{channel_prefix}:{channel}", junk)

    async def counted() -> bool:
        return int((await broadcaster_stats(session, pod))["malformed"]) >= 6

    await eventually(counted)
    # ...and nothing of it reached the member: the next frame but presence
    # events is the probe's pong.
    await send(ws, {"type": "ping", "ref": "probe"})
    async with asyncio.timeout(10):
        while True:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            frame = orjson.loads(msg.data)
            if frame["type"] not in ("member_joined", "member_left", "presence"):
                break
    assert frame == {"type": "pong", "ref": "probe"}
    await ws.close()
    assert_clean_exit(pod)


def url_form(server: RedisServer, form: str) -> str:
    """README's REDIS_URL forms: redis://:password@host:6379/0,
    unix:///run/redis.sock?password=…&db=0, rediss://… with
    ?ssl_ca_certs=/path/ca.pem, or with ?ssl_cert_reqs=none."""
    return {
        "password-and-db": server.url.replace("/0", "/3"),
        "unix": f"{server.unix_url}&db=2",
        "rediss-ca": server.url,
        "rediss-no-verify": server.url.split("?")[0] + "?ssl_cert_reqs=none",
    }[form]


def form_server(form: str) -> RedisServer:
    try:
        return RedisServer(password=f"pw-{form}", tls=form.startswith("rediss")).start()
    except TlsUnsupported as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:  # no openssl to make certificates with
        pytest.skip(f"cannot make certificates here: {exc}")


@pytest.mark.parametrize("form", ["password-and-db", "unix", "rediss-ca", "rediss-no-verify"])
async def test_each_documented_redis_url_form_links_two_pods(
    pod_factory: PodFactory, channel_prefix: str, session: aiohttp.ClientSession, form: str
) -> None:
    server = form_server(form)
    try:
        pods = start_cluster(pod_factory, url_form(server, form), channel_prefix, 2)
        await wait_links(session, pods, up=True)
        a, _ = await connect(session, pods[0].ws_url("general"))
        b, _ = await connect(session, pods[1].ws_url("general"))
        await wait_numsub(server, f"{channel_prefix}:room:general", 2)
        await send(a, {"type": "message", "data": form})
        assert (await recv_type(b, "message"))["data"] == form
        await a.close()
        await b.close()
        if form != "unix":  # (that one: the next test)
            for pod in pods:
                assert_clean_exit(pod)
                assert f"pw-{form}" not in pod.log
    finally:
        server.close()


async def test_the_password_of_a_unix_url_stays_out_of_the_log(
    pod_factory: PodFactory, channel_prefix: str, session: aiohttp.ClientSession
) -> None:
    server = form_server("unix")
    try:
        pod = start_cluster(pod_factory, url_form(server, "unix"), channel_prefix, 1)[0]
        await wait_links(session, [pod], up=True)
        assert_clean_exit(pod)
        assert "pw-unix" not in pod.log
    finally:
        server.close()
