"""The WebSocket service end to end: a real pod, real clients."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import aiohttp
import pytest

from .conftest import PodFactory
from .support import (
    DEFAULT_TIMEOUT,
    Pod,
    connect,
    eventually,
    get_json,
    raw_ws_connect,
    recv,
    recv_type,
    send,
)

pytestmark = pytest.mark.contract


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return result


async def assert_silent(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Nothing more arrives: a ping's pong comes back first (frames are in order)."""
    await send(ws, {"type": "ping", "ref": "probe"})
    frame = await recv(ws)
    assert frame == {"type": "pong", "ref": "probe"}


async def test_welcome_frame(pod: Pod, session: aiohttp.ClientSession) -> None:
    ws, welcome = await connect(session, pod.ws_url("general", name="Ada"))
    assert welcome["pod"] == pod.name
    assert welcome["room"] == "general"
    assert welcome["rooms"] == ["general"]
    assert welcome["user"]["name"] == "Ada"
    assert welcome["connection_id"]
    assert welcome["limits"]["max_message_bytes"] == 65536
    await ws.close()


async def test_room_message_reaches_members_and_sender_not_other_rooms(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    a, wa = await connect(session, pod.ws_url("general", name="Ada"))
    b, _ = await connect(session, pod.ws_url("general"))
    other, _ = await connect(session, pod.ws_url("random"))
    await send(a, {"type": "message", "data": {"text": "hi"}})
    frames = [await recv_type(ws, "message") for ws in (a, b)]
    assert frames[0] == frames[1]
    frame = frames[0]
    assert set(frame) == {"type", "room", "id", "from", "ts", "data", "offset", "epoch"}
    assert frame["room"] == "general"
    assert frame["data"] == {"text": "hi"}
    assert frame["from"] == wa["user"] == {"id": wa["user"]["id"], "name": "Ada"}
    assert isinstance(frame["ts"], int)
    await assert_silent(other)
    for ws in (a, b, other):
        await ws.close()


async def test_from_cannot_be_spoofed(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, wa = await connect(session, pod.ws_url("general"))
    await send(a, {"type": "message", "data": 1, "from": {"id": "admin", "name": "root"}})
    frame = await recv_type(a, "message")
    assert frame["from"] == wa["user"]
    await a.close()


async def test_global_endpoint_reaches_every_connection(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    g, _ = await connect(session, pod.ws_url())
    r1, _ = await connect(session, pod.ws_url("r1"))
    r2, _ = await connect(session, pod.ws_url("r2"))
    await send(g, {"type": "message", "data": "to all"})
    for ws in (g, r1, r2):
        frame = await recv_type(ws, "message")
        assert frame["room"] is None
        assert frame["data"] == "to all"
    # ...while a room message stays in its room.
    await send(r1, {"type": "message", "data": "r1 only"})
    assert (await recv_type(r1, "message"))["data"] == "r1 only"
    await assert_silent(g)
    await assert_silent(r2)
    for ws in (g, r1, r2):
        await ws.close()


async def test_ack_carries_ref_and_message_id(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    await send(a, {"type": "message", "data": "x", "ref": "m-1"})
    message = await recv_type(a, "message")
    ack = await recv_type(a, "ack")
    assert ack == {
        "type": "ack",
        "ref": "m-1",
        "id": message["id"],
        "room": "general",
        "offset": message["offset"],
        "epoch": message["epoch"],
    }
    await send(a, {"type": "message", "data": "y"})  # no ref, no ack
    await recv_type(a, "message")
    await assert_silent(a)
    await a.close()


async def test_message_ids_are_unique(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    for i in range(50):
        await send(a, {"type": "message", "data": i})
    ids = {(await recv_type(a, "message"))["id"] for _ in range(50)}
    assert len(ids) == 50
    await a.close()


async def test_join_send_to_a_room_and_leave(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("side"))
    await send(a, {"type": "join", "room": "side", "ref": 1})
    assert await recv_type(a, "joined") == {"type": "joined", "room": "side", "ref": 1}
    await send(a, {"type": "message", "room": "side", "data": "hello side"})
    assert (await recv_type(b, "message"))["room"] == "side"
    assert (await recv_type(a, "message"))["room"] == "side"
    await send(a, {"type": "leave", "room": "side"})
    await recv_type(a, "left")
    await send(b, {"type": "message", "data": "after leave"})
    await recv_type(b, "message")
    await assert_silent(a)
    await send(a, {"type": "message", "room": "side", "data": "x", "ref": 9})
    error = await recv_type(a, "error")
    assert (error["code"], error["ref"]) == ("not_in_room", 9)
    await a.close()
    await b.close()


async def test_rooms_per_connection_are_capped(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"MAX_ROOMS_PER_CONNECTION": "2"})
    a, _ = await connect(session, pod.ws_url("r0"))
    await send(a, {"type": "join", "room": "r1"})
    await recv_type(a, "joined")
    await send(a, {"type": "join", "room": "r2"})
    assert (await recv_type(a, "error"))["code"] == "too_many_rooms"
    await a.close()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("this is not json", "invalid_json"),
        ("[1, 2, 3]", "invalid_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "message"}', "missing_data"),
        ('{"type": "join", "room": "bad room"}', "invalid_room"),
    ],
)
async def test_bad_frames_get_an_error_and_the_connection_stays_usable(
    pod: Pod, session: aiohttp.ClientSession, raw: str, code: str
) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await a.send_str(raw)
    error = await recv_type(a, "error")
    assert error["code"] == code
    assert error["message"]
    await send(a, {"type": "message", "data": "still here"})
    assert (await recv_type(b, "message"))["data"] == "still here"
    assert (await stats(session, pod))["errors_sent"] == 1
    await a.close()
    await b.close()


async def test_binary_frame_is_closed_with_1003(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    other, _ = await connect(session, pod.ws_url("general"))
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await a.send_bytes(b"\x00\x01")
    msg = await recv(a)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == 1003
    assert "binary" in msg.extra
    await assert_silent(other)
    await other.close()


async def test_oversize_frame_is_closed_with_1009(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"MAX_MESSAGE_BYTES": "1024"})
    a, _ = await connect(session, pod.ws_url("general"))
    other, _ = await connect(session, pod.ws_url("general"))
    await send(a, {"type": "message", "data": "x" * 2000})
    msg = await recv(a)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert msg.data == 1009
    await send(other, {"type": "message", "data": "x" * 900})
    assert (await recv_type(other, "message"))["data"] == "x" * 900
    await other.close()


async def test_invalid_room_in_url_is_refused_before_upgrade(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await session.ws_connect(pod.ws_url("bad*room"))
    assert info.value.status == 400


async def test_stats_follow_joins_leaves_and_closes(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    c, _ = await connect(session, pod.ws_url())
    s = await stats(session, pod)
    assert s["pod"] == pod.name
    assert s["connections"] == {"open": 3, "accepted": 3}
    assert s["rooms"] == {"general": 2}
    assert s["broadcaster"]["state"] == "local-only"
    await send(a, {"type": "message", "data": 1})
    await recv_type(b, "message")
    s = await stats(session, pod)
    assert s["messages"]["received"] == 1
    assert s["messages"]["delivered"] == 2
    await send(c, {"type": "join", "room": "side"})
    await recv_type(c, "joined")
    assert (await stats(session, pod))["rooms"] == {"general": 2, "side": 1}
    await a.close()
    await c.close()

    async def settled() -> bool:
        s = await stats(session, pod)
        return s["connections"]["open"] == 1 and s["rooms"] == {"general": 1}

    await eventually(settled)
    await b.close()


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_client_vanishing_without_close_leaves_no_stale_member(
    pod: Pod, session: aiohttp.ClientSession, how: str
) -> None:
    sock = raw_ws_connect(pod.port, "/api/chat-api/ws/general")
    b, _ = await connect(session, pod.ws_url("general"))
    assert (await stats(session, pod))["rooms"] == {"general": 2}
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

    async def gone() -> bool:
        s = await stats(session, pod)
        return s["rooms"] == {"general": 1} and s["connections"]["open"] == 1

    await eventually(gone)
    await send(b, {"type": "message", "data": "anyone?"})
    await recv_type(b, "message")
    await b.close()


async def test_client_that_never_reads_is_dropped_others_keep_receiving(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    # A flood on purpose: the per-connection rate limit is off.
    pod = pod_factory(
        {"SEND_BUFFER_BYTES": "65536", "WS_CLOSE_TIMEOUT": "1", "RATE_LIMIT_PER_SECOND": "0"}
    )
    stuck = raw_ws_connect(pod.port, "/api/chat-api/ws/general", rcvbuf=4096)
    sender, _ = await connect(session, pod.ws_url("general"))
    receiver, _ = await connect(session, pod.ws_url("general"))
    payload = "x" * 4000
    received = 0

    async def read_all(ws: aiohttp.ClientWebSocketResponse, count: list[int]) -> None:
        while True:
            frame = await recv(ws)
            if not isinstance(frame, dict):
                return
            if frame["type"] == "message":
                count[0] += 1

    sender_count, receiver_count = [0], [0]
    readers = [
        asyncio.create_task(read_all(sender, sender_count)),
        asyncio.create_task(read_all(receiver, receiver_count)),
    ]
    sent = 0
    try:
        # Bounded: kernel buffers on loopback hold a few MB at most.
        for _ in range(40):
            for _ in range(100):
                await send(sender, {"type": "message", "data": payload})
                sent += 1
            if (await stats(session, pod))["slow_client_disconnects"]:
                break
        s = await stats(session, pod)
        assert s["slow_client_disconnects"] == 1

        async def gone() -> bool:  # a member until its socket is gone (WS_CLOSE_TIMEOUT)
            return (await stats(session, pod))["rooms"] == {"general": 2}

        await eventually(gone, timeout=5)

        async def caught_up() -> bool:
            return receiver_count[0] == sent and sender_count[0] == sent

        await eventually(caught_up, timeout=20)
        received = receiver_count[0]
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        stuck.close()
    assert received == sent
    await sender.close()
    await receiver.close()


async def test_app_level_ping(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url())
    await send(a, {"type": "ping", "ref": 42})
    assert await recv_type(a, "pong") == {"type": "pong", "ref": 42}
    await a.close()


async def test_health_and_readiness(pod: Pod, session: aiohttp.ClientSession) -> None:
    assert await get_json(session, f"{pod.base}/healthz") == {"status": "ok"}
    ready = await get_json(session, f"{pod.base}/readyz")
    assert ready["ready"] is True
    assert ready["broadcaster"] == "local-only"


# The pong deadline is half the ping interval: 1 s, which a loaded machine
# still meets (0.2 s, before, it might not).
PING_INTERVAL = "2.0"


@pytest.mark.slow
@pytest.mark.aiohttp_only("the keepalive (WS_PING_INTERVAL) is the server's under ASGI")
async def test_client_that_ignores_pings_is_dropped(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"WS_PING_INTERVAL": PING_INTERVAL})
    # A client that never reads is deaf (and this one would not answer anyway).
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        deaf = await session.ws_connect(pod.ws_url("general"), autoping=False)
    alive, _ = await connect(session, pod.ws_url("general"))
    frames: asyncio.Queue[Any] = asyncio.Queue()

    async def keep_reading() -> None:
        while isinstance(frame := await recv(alive, timeout=30), dict):
            await frames.put(frame)

    reader = asyncio.create_task(keep_reading())
    try:

        async def only_alive_left() -> bool:
            s = await stats(session, pod)
            return s["connections"]["open"] == 1 and s["rooms"] == {"general": 1}

        await eventually(only_alive_left, timeout=20)
        # What the deaf client was sent is still in its buffer: the close says why.
        async with asyncio.timeout(10):
            while (msg := await deaf.receive()).type is not aiohttp.WSMsgType.CLOSE:
                assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.PING), msg
        assert (msg.data, msg.extra) == (1001, "no answer to ping")
        await send(alive, {"type": "message", "data": "still alive"})
        async with asyncio.timeout(10):
            while (frame := await frames.get())["type"] != "message":
                pass
        assert frame["data"] == "still alive"
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    await deaf.close()
    await alive.close()


@pytest.mark.slow
@pytest.mark.aiohttp_only("the keepalive (WS_PING_INTERVAL) is the server's under ASGI")
async def test_a_quiet_client_that_answers_pings_stays(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"WS_PING_INTERVAL": PING_INTERVAL})
    ws, _ = await connect(session, pod.ws_url("general"), autoping=False)
    # Several pings, each answered, and nothing else sent: the client is
    # quiet but alive, and outlives several pong deadlines.
    pings = 0
    while pings < 3:
        msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.TEXT), msg
        if msg.type is aiohttp.WSMsgType.PING:  # (TEXT: presence events)
            pings += 1
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                await ws.pong(msg.data)
    assert (await stats(session, pod))["connections"]["open"] == 1
    await send(ws, {"type": "ping", "ref": 1})
    assert await recv_type(ws, "pong") == {"type": "pong", "ref": 1}
    await ws.close()


async def test_a_client_ping_is_answered_with_its_payload(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, pod.ws_url("general"), autoping=False)
    for payload in (b"", b"are you there", bytes(range(125))):  # 125: the most allowed
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await ws.ping(payload)
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.PONG
        assert msg.data == payload
    await ws.close()


async def test_a_message_without_room_after_leaving_the_url_room_is_not_in_room(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    await send(a, {"type": "leave", "room": "general"})
    await recv_type(a, "left")
    await send(a, {"type": "message", "data": "ghost", "ref": 5})
    answer = await recv(a)  # the next frame but presence events answers it
    while answer["type"] in ("member_joined", "member_left", "presence"):
        answer = await recv(a)
    assert (answer["type"], answer.get("code"), answer["ref"]) == ("error", "not_in_room", 5)
    await assert_silent(b)
    await a.close()
    await b.close()


async def test_joining_twice_is_harmless_and_leaving_twice_is_not_in_room(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("side"))
    for ref in (1, 2):
        await send(a, {"type": "join", "room": "side", "ref": ref})
        assert await recv_type(a, "joined") == {"type": "joined", "room": "side", "ref": ref}
    assert (await stats(session, pod))["rooms"] == {"general": 1, "side": 2}
    await send(b, {"type": "message", "data": "once"})
    assert (await recv_type(a, "message"))["data"] == "once"
    await assert_silent(a)  # delivered once, not once per join
    await send(a, {"type": "leave", "room": "side", "ref": 3})
    assert await recv_type(a, "left") == {"type": "left", "room": "side", "ref": 3}
    await send(a, {"type": "leave", "room": "side", "ref": 4})
    error = await recv_type(a, "error")
    assert (error["code"], error["ref"]) == ("not_in_room", 4)
    assert (await stats(session, pod))["rooms"] == {"general": 1, "side": 1}
    await a.close()
    await b.close()
