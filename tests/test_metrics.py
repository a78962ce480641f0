"""``GET /metrics``: the contract's names, what moves them, who may read them.

Real pods, real WebSocket clients, prometheus-client's own text parser; the
Redis metrics against a real redis-server that is stopped and started again.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from realtime.core.histogram import Histogram, message_ts
from realtime.core.protocol import Identity, Message, entry_payload
from realtime.node import close_label

from .conftest import PodFactory, redis_pod_env
from .redis_support import RedisServer
from .support import DEFAULT_TIMEOUT, Pod, connect, eventually, recv_type, send

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(session: aiohttp.ClientSession, base: str, *, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        asyncio.timeout(DEFAULT_TIMEOUT),
        session.get(f"{base}/metrics", headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the pure parts ----------------------------------------------------------------


def test_histogram_counts_each_value_in_the_first_bucket_that_holds_it() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1, 1]  # <= 0.1, <= 1, +Inf
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert h.count == 4
    assert h.sum == pytest.approx(3.65)
    with h.time():
        pass
    assert h.counts[0] == 3
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.5))


def test_message_ts_reads_the_servers_timestamp_never_the_clients_data() -> None:
    sender = Identity(id='x"ts":1,', name='"ts":2,')
    message = Message(id="m-1", room="r", sender=sender, ts=1234, data={"ts": 99})
    assert message_ts(message.encode()) == 1234
    assert message_ts(entry_payload(message.body(), "e" * 16, 7)) == 1234
    assert message_ts(b'{"type":"member_joined","ts":5}') is None
    assert message_ts(b'{"type":"message","ts":x}') is None


def test_close_labels_are_a_bounded_set() -> None:
    assert close_label(1001) == "1001"
    assert close_label(None) == "1006"
    assert close_label(0) == "1005"
    assert close_label(3333) == "3xxx"
    assert close_label(4999) == "4xxx"
    assert close_label(2000) == "other"
    assert len({close_label(c) for c in range(-1, 70000)}) <= 20


# -- a local-only pod ----------------------------------------------------------------


async def test_traffic_moves_the_counters_and_no_label_names_a_room_or_user(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(
        {"PUBLISH_API_KEY": "k" * 40, "RATE_LIMIT_PER_SECOND": "1", "RATE_LIMIT_BURST": "3"}
    )
    before = await scrape(session, pod.base)
    assert value(before, "chat_api_connections") == 0
    assert value(before, "chat_api_redis_link_up") == 1  # local-only needs no link

    ws, _ = await connect(session, pod.ws_url("secret-room", history="5", name="Zelda"))
    other, _ = await connect(session, pod.ws_url())  # the global channel
    await send(ws, {"type": "message", "data": "hi", "ref": 1})
    await recv_type(ws, "ack")
    await send(other, {"type": "message", "data": "to everyone"})
    await recv_type(other, "message")
    await send(ws, {"type": "nope"})
    assert (await recv_type(ws, "error"))["code"] == "unknown_type"
    await send(ws, {"type": "ping"})
    await recv_type(ws, "pong")
    await send(ws, {"type": "ping"})
    assert (await recv_type(ws, "error"))["code"] == "rate_limited"  # burst of 3 used up
    async with session.post(
        f"{pod.base}/api/chat-api/rooms/secret-room/messages",
        json={"data": "from a backend"},
        headers={"Authorization": f"Bearer {'k' * 40}"},
    ) as resp:
        assert resp.status == 201
    mid = await scrape(session, pod.base)
    assert value(mid, "chat_api_connections") == 2
    await ws.close(code=1001)
    await other.send_bytes(b"binary")  # the server closes with 1003
    assert (await other.receive()).data == 1003
    await other.close()
    async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(pod.ws_url("bad room!")) as resp:
        assert resp.status == 400  # refused before the upgrade: no WebSocket headers needed

    async def closed() -> bool:
        s = await scrape(session, pod.base)
        return value(s, "chat_api_connections") == 0

    await eventually(closed)
    after = await scrape(session, pod.base)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        change = value(after, name, **labels) - value(before, name, **labels)
        assert change == by, (name, labels, change)

    grew("chat_api_connections_opened_total", 2)
    grew("chat_api_connections_closed_total", code="1001")
    grew("chat_api_connections_closed_total", code="1003")
    grew("chat_api_frames_received_total", 6)
    grew("chat_api_errors_sent_total", code="unknown_type")
    grew("chat_api_errors_sent_total", code="rate_limited")
    grew("chat_api_rate_limited_total")
    grew("chat_api_messages_published_total", scope="room")
    grew("chat_api_messages_published_total", scope="global")
    grew("chat_api_messages_published_total", scope="api")
    grew("chat_api_catchups_total", result="complete")
    # broadcasts: the room message to 1, the global one to 2, the API's to 1 (and
    # presence events); frames to one connection (acks, errors) are not deliveries
    deliveries = value(after, "chat_api_deliveries_total") - value(
        before, "chat_api_deliveries_total"
    )
    assert 4 <= deliveries <= 6
    # the lag: once per message, not per recipient
    grew("chat_api_delivery_lag_seconds_count", 3)
    assert value(after, "chat_api_delivery_lag_seconds_bucket", le="+Inf") == 3
    assert value(after, "chat_api_delivery_lag_seconds_sum") < 3
    assert value(after, "chat_api_connections_closed_total", code="http_400") == 1

    async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(f"{pod.base}/metrics") as resp:
        text = await resp.text()
    for secret in ("secret-room", "Zelda", "guest-"):
        assert secret not in text
    labels = {k for _name, pairs in after for k, _ in pairs}
    process_labels = {"generation", "implementation", "major", "minor", "patchlevel", "version"}
    assert labels <= {"code", "scope", "result", "le", *process_labels}, labels
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= {
        name for name, _ in after
    }


# -- who may read them ---------------------------------------------------------------


async def test_metrics_are_protected_like_the_stats(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    token = "stats-" + "t" * 40
    pod = pod_factory({"STATS_TOKEN": token})
    async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(f"{pod.base}/metrics") as resp:
        assert resp.status == 401
        assert "STATS_TOKEN or an admin token" in await resp.text()
    headers = {"Authorization": "Bearer wrong"}
    async with (
        asyncio.timeout(DEFAULT_TIMEOUT),
        session.get(f"{pod.base}/metrics", headers=headers) as resp,
    ):
        assert resp.status == 403
    assert "chat_api_connections" in {
        name for name, _ in await scrape(session, pod.base, token=token)
    }


async def test_metrics_port_serves_them_alone_without_auth(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    pod = pod_factory({"STATS_TOKEN": "stats-" + "t" * 40, "METRICS_PORT": str(port)})
    pod.wait_for_log(rf"metrics on http://127\.0\.0\.1:{port}/metrics")
    samples = await scrape(session, f"http://127.0.0.1:{port}")
    assert value(samples, "chat_api_connections") == 0
    async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(f"{pod.base}/metrics") as resp:
        assert resp.status == 404  # not on the main port
    async with (
        asyncio.timeout(DEFAULT_TIMEOUT),
        session.get(f"http://127.0.0.1:{port}/api/chat-api/ws/stats") as resp,
    ):
        assert resp.status == 404  # nothing else on the metrics port
    assert pod.stop() == 0


# -- Redis ------------------------------------------------------------------------


@pytest.mark.slow
async def test_redis_link_metrics_follow_a_redis_restart(
    pod_factory: PodFactory,
    redis_server: RedisServer,
    channel_prefix: str,
    session: aiohttp.ClientSession,
) -> None:
    pod = pod_factory(redis_pod_env(redis_server.url, channel_prefix))

    async def samples_where(check: str, expected: float) -> Samples:
        async def ok() -> Samples | None:
            s = await scrape(session, pod.base)
            return s if value(s, check) == expected else None

        found: Samples = await eventually(ok)
        return found

    up = await samples_where("chat_api_redis_link_up", 1)
    reconnects = value(up, "chat_api_redis_reconnects_total")
    ws, _ = await connect(session, pod.ws_url("general"))
    await send(ws, {"type": "message", "data": "up", "ref": 1})
    assert (await recv_type(ws, "ack"))["offset"] == 1

    async def measured() -> bool:  # the append's batch, and the heartbeats'
        s = await scrape(session, pod.base)
        return value(s, "chat_api_redis_roundtrip_seconds_count") > 0

    await eventually(measured)

    redis_server.stop()
    await samples_where("chat_api_redis_link_up", 0)
    await send(ws, {"type": "message", "data": "down", "ref": 2})
    assert (await recv_type(ws, "ack"))["offset"] is None
    down = await scrape(session, pod.base)
    assert value(down, "chat_api_redis_publish_failures_total") >= 1

    redis_server.restart()
    back = await samples_where("chat_api_redis_link_up", 1)
    assert value(back, "chat_api_redis_reconnects_total") == reconnects + 1
    rt_sum = value(back, "chat_api_redis_roundtrip_seconds_sum")
    assert 0 < rt_sum < value(back, "chat_api_redis_roundtrip_seconds_count")  # < 1 s each
    await ws.close()


# -- the ASGI example --------------------------------------------------------------


async def test_the_fastapi_example_serves_the_same_metrics(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod: Pod = pod_factory(transport_name="asgi")
    ws, _ = await connect(session, pod.ws_url("general"))
    await ws.close(code=4000)

    async def counted() -> bool:
        s = await scrape(session, pod.base)
        return value(s, "chat_api_connections_closed_total", code="4xxx") == 1

    await eventually(counted)
