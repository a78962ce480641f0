"""Hostile and broken input against a live pod: each case gets an error frame
(the connection stays usable) or a close with a standard code and reason,
and never disturbs another client."""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

import aiohttp
import orjson
import pytest
from yarl import URL

from .conftest import PodFactory
from .support import DEFAULT_TIMEOUT, Pod, connect, eventually, get_json, recv, recv_type, send


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return result


async def still_usable(
    ws: aiohttp.ClientWebSocketResponse, peer: aiohttp.ClientWebSocketResponse
) -> None:
    """``ws`` can still talk to ``peer`` in their room."""
    await send(ws, {"type": "message", "data": "still here", "ref": "alive"})
    assert (await recv_type(peer, "message"))["data"] == "still here"
    assert (await recv_type(ws, "ack"))["ref"] == "alive"


async def expect_close(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while True:
            msg = await recv(ws)
            if not isinstance(msg, dict):
                assert msg.type is aiohttp.WSMsgType.CLOSE, msg
                return msg.data, msg.extra


# -- frames answered with an error frame --------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


MALFORMED = [
    ("[]", "invalid_frame"),
    ("1", "invalid_frame"),
    ('"message"', "invalid_frame"),
    ("null", "invalid_frame"),
    ("{}", "invalid_frame"),
    ('{"type": 7}', "invalid_frame"),
    ('{"type": "message", "data": 1, "ref": {"a": 1}}', "invalid_frame"),
    ('{"type": "message", "data": 1, "ref": true}', "invalid_frame"),
    ('{"type": "teleport", "data": 1}', "unknown_type"),
    ('{"type": "message"}', "missing_data"),
    ('{"type": "message", "data": ' + nested(33) + "}", "invalid_frame"),
    ('{"type": "message", "data": ' + nested(300) + "}", "invalid_frame"),
    ('{"type": "message", "data": ' + nested(2000) + "}", "invalid_json"),
    ('{"type": "message", "data": 1e400}', "invalid_json"),
    ('{"type": "message", "data": -1e999999}', "invalid_json"),
    ('{"type": "message", "data": NaN}', "invalid_json"),
    ('{"type": "message", "data": 1,}', "invalid_json"),
    ("\ufeff{}", "invalid_json"),
    ("", "invalid_json"),
    ('{"type": "message", "data": "\\ud800"}', "invalid_json"),
]


async def test_malformed_frames_get_an_error_frame(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    for raw, code in MALFORMED:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await a.send_str(raw)
        error = await recv_type(a, "error")
        assert error["code"] == code, (raw[:40], error)
        assert len(error["message"]) < 200  # the frame is not echoed back
        await still_usable(a, b)
    assert (await stats(session, pod))["errors_sent"] == len(MALFORMED)
    assert "Traceback" not in pod.log
    await a.close()
    await b.close()


async def test_odd_but_valid_data_is_relayed_unchanged(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    for data in (
        orjson.loads(nested(32)),
        -(2**63),
        "\u0000\u202e\U0001f600",
        {"": {"\n": None}},
    ):
        await send(a, {"type": "message", "data": data})
        frame = await recv_type(a, "message")
        assert frame["data"] == data
    # Integers beyond 64 bits arrive as the nearest double.
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await a.send_str('{"type": "message", "data": 123456789012345678901234567890}')
    assert (await recv_type(a, "message"))["data"] == 1.2345678901234568e29
    # Unknown fields are ignored; "from" cannot be set by the client.
    await send(a, {"type": "message", "data": 1, "from": "admin", "id": "x", "ts": 0})
    frame = await recv_type(a, "message")
    assert frame["from"]["id"].startswith("guest-")
    assert frame["id"] != "x"
    assert frame["ts"] > 0
    await a.close()


# -- room names -------------------------------------------------------------------------

BAD_ROOMS = [
    "a*b",
    "*",
    "a?b",
    "a[b]",
    "a b",
    "a\tb",
    " a",
    "a\x00b",
    "a\x01b",
    "a\x7fb",
    "a\nb",
    "é",
    "a/b",
    ".hidden",
    "-x",
    "x" * 65,
    "",
]


async def test_bad_room_names_in_join_frames(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    for i, room in enumerate([*BAD_ROOMS, None, 7, ["a"], {"r": 1}]):
        # (A message without a room goes to the connection's room.)
        for kind in ("join", "leave") if room is None else ("join", "leave", "message"):
            await send(a, {"type": kind, "room": room, "data": 1, "ref": i})
            error = await recv_type(a, "error")
            assert (error["code"], error["ref"]) == ("invalid_room", i), (kind, room)
    await still_usable(a, b)
    s = await stats(session, pod)
    assert s["rooms"] == {"general": 2}
    await a.close()
    await b.close()


BAD_URL_ROOMS = [
    "a%2Ab",
    "%2A",
    "a%3Fb",
    "a%5Bb%5D",
    "a%20b",
    "a%09b",
    "a%00b",
    "a%01b",
    "a%0Ab",
    "%C3%A9",
    "a%2Fb",
    ".hidden",
    "x" * 65,
    "a%ZZ",
]


async def test_bad_room_names_in_the_url_are_refused_before_the_upgrade(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    for path in BAD_URL_ROOMS:
        url = f"ws://127.0.0.1:{pod.port}/api/chat-api/ws/{path}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                await session.ws_connect(URL(url, encoded=True))
        assert info.value.status == 400, path
    s = await stats(session, pod)
    assert s["refused"] == {"400": len(BAD_URL_ROOMS)}
    assert s["rooms"] == {}
    assert s["connections"]["accepted"] == 0


# -- closes -----------------------------------------------------------------------------


async def test_invalid_utf8_closes_with_1007(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await a.send_frame(b'{"type":"message","data":"\xff\xfe"}', aiohttp.WSMsgType.TEXT)
    code, _ = await expect_close(a)
    assert code == 1007
    await send(b, {"type": "ping", "ref": 1})
    assert (await recv_type(b, "pong"))["ref"] == 1
    assert "Traceback" not in pod.log
    await b.close()


async def test_frame_size_limit_closes_with_1009(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"MAX_MESSAGE_BYTES": "1024"})
    a, welcome = await connect(session, pod.ws_url("general"))
    assert welcome["limits"]["max_message_bytes"] == 1024
    b, _ = await connect(session, pod.ws_url("general"))

    def sized(n: int) -> str:
        empty = orjson.dumps({"type": "message", "data": ""}).decode()
        return empty[:-2] + "x" * (n - len(empty)) + '"}'

    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await a.send_str(sized(1024))  # exactly the limit: accepted
    assert len((await recv_type(b, "message"))["data"]) == 1024 - len(sized(0))
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await a.send_str(sized(1025))
    code, _ = await expect_close(a)
    assert code == 1009
    await send(b, {"type": "ping", "ref": 1})
    assert (await recv_type(b, "pong"))["ref"] == 1
    await b.close()


async def test_binary_frames_close_with_1003(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        await a.send_bytes(orjson.dumps({"type": "message", "data": 1}))
    assert await expect_close(a) == (1003, "binary frames are not supported; send JSON text frames")


# -- rate limit -------------------------------------------------------------------------


async def test_over_the_rate_limit_gets_rate_limited_and_stays_usable(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(
        {"RATE_LIMIT_PER_SECOND": "5", "RATE_LIMIT_BURST": "5", "RATE_LIMIT_MAX_REFUSED": "1000"}
    )
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    for i in range(10):
        await send(a, {"type": "message", "data": i, "ref": i})
    acks, limited = [], []
    while len(acks) + len(limited) < 10:
        frame = await recv(a)
        if frame["type"] == "ack":
            acks.append(frame["ref"])
        elif frame["type"] == "error":
            assert frame["code"] == "rate_limited"
            limited.append(frame["ref"])
    # The burst went through; what followed within the same instant did not
    # (a token or two may have refilled meanwhile).
    assert acks[:5] == [0, 1, 2, 3, 4]
    assert len(limited) >= 3
    assert sorted(acks + limited) == list(range(10))
    delivered = [(await recv_type(b, "message"))["data"] for _ in acks]
    assert delivered == acks
    s = await stats(session, pod)
    assert s["rate_limited"] == len(limited)

    # Once tokens refill the connection is usable again (eventually: no sleeps).
    async def accepted() -> bool:
        await send(a, {"type": "ping", "ref": "p"})
        frame = await recv(a)
        return bool(frame["type"] == "pong")

    await eventually(accepted, timeout=5, interval=0.25)
    await a.close()
    await b.close()


async def test_a_flood_is_closed_with_1008_others_unaffected(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory(
        {"RATE_LIMIT_PER_SECOND": "10", "RATE_LIMIT_BURST": "10", "RATE_LIMIT_MAX_REFUSED": "20"}
    )
    flooder, _ = await connect(session, pod.ws_url("general"))
    calm, _ = await connect(session, pod.ws_url("general"))
    for i in range(200):  # bounded; far faster than 10/s
        if flooder.closed:
            break
        await send(flooder, {"type": "message", "data": i})
    code, reason = await expect_close(flooder)
    assert (code, reason) == (1008, "rate limit exceeded")
    await send(calm, {"type": "message", "data": "fine", "ref": 1})
    assert (await recv_type(calm, "ack"))["ref"] == 1
    s = await stats(session, pod)
    assert s["policy_closes"]["rate_limit"] == 1
    assert s["connections"]["open"] == 1
    await calm.close()


# -- capacity ---------------------------------------------------------------------------


async def test_connections_over_the_cap_get_503_before_the_upgrade(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"MAX_CONNECTIONS": "2"})
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            await session.ws_connect(pod.ws_url("general"))
    assert info.value.status == 503
    assert info.value.headers is not None
    assert info.value.headers["Retry-After"] == "1"
    s = await stats(session, pod)
    assert s["refused"] == {"503": 1}
    assert s["connections"]["open"] == 2
    await a.close()

    async def room_shrunk() -> bool:
        return (await stats(session, pod))["connections"]["open"] == 1

    await eventually(room_shrunk)
    c, _ = await connect(session, pod.ws_url("general"))
    await still_usable(c, b)
    await b.close()
    await c.close()


async def test_rooms_per_connection_are_capped(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"MAX_ROOMS_PER_CONNECTION": "2"})
    a, _ = await connect(session, pod.ws_url("one"))
    await send(a, {"type": "join", "room": "two"})
    await recv_type(a, "joined")
    await send(a, {"type": "join", "room": "three", "ref": 3})
    error = await recv_type(a, "error")
    assert (error["code"], error["ref"]) == ("too_many_rooms", 3)
    await send(a, {"type": "ping"})
    await recv_type(a, "pong")
    await a.close()


# -- broken HTTP ------------------------------------------------------------------------


def http_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return what the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


async def test_malformed_http_is_refused_quietly(pod: Pod, session: aiohttp.ClientSession) -> None:
    member, _ = await connect(session, pod.ws_url("general"))
    token_like = "eyJ" + "A" * 9000
    requests = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # TLS to a plain port
        b"GARBAGE\r\n\r\n",
        f"GET /api/chat-api/ws/general?access_token={token_like} HTTP/1.1\r\n\r\n".encode(),
        f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token_like}\r\n\r\n".encode(),
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(300)) + b"\r\n",
    ]
    for request in requests:
        answer = await asyncio.to_thread(http_exchange, pod.port, request)
        assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:80]
    await send(member, {"type": "ping", "ref": 1})
    assert (await recv_type(member, "pong"))["ref"] == 1
    await member.close()
    assert "Traceback" not in pod.log
    assert " ERROR " not in pod.log
    assert "AAAAAAAA" not in pod.log
