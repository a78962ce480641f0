"""POST /api/chat-api/rooms/{room}/messages: backends publish into rooms."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from .conftest import PodFactory, redis_pod_env
from .support import Pod, connect, recv, recv_type

KEY = "s3cret-key"


async def post(
    session: aiohttp.ClientSession,
    pod: Pod,
    room: str,
    body: Any,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    url = f"{pod.base}/api/chat-api/rooms/{room}/messages"
    async with asyncio.timeout(10), session.post(url, json=body, headers=all_headers) as resp:
        return resp.status, await resp.json()


@pytest.fixture
def keyed_pod(pod_factory: PodFactory) -> Pod:
    return pod_factory({"PUBLISH_API_KEY": KEY})


async def test_publish_reaches_members_with_an_offset(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, keyed_pod.ws_url("news"))
    status, reply = await post(session, keyed_pod, "news", {"data": {"text": "hello"}})
    assert status == 201
    frame = await recv_type(ws, "message")
    assert frame["data"] == {"text": "hello"}
    assert frame["from"] == {"id": "server", "name": "server"}
    assert (frame["id"], frame["offset"], frame["epoch"]) == (
        reply["id"],
        reply["offset"],
        reply["epoch"],
    )
    assert reply["duplicate"] is False
    await ws.close()


async def test_idempotency_key_delivers_a_retry_once(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, keyed_pod.ws_url("news"))
    body = {"data": "once", "from": {"id": "billing", "name": "Billing"}}
    headers = {"Idempotency-Key": "order-42"}
    first = await post(session, keyed_pod, "news", body, headers=headers)
    again = await post(session, keyed_pod, "news", body, headers=headers)
    in_body = await post(session, keyed_pod, "news", {**body, "idempotency_key": "order-42"})
    assert first[0] == 201
    assert again[0] == in_body[0] == 200
    assert again[1] == in_body[1] == {**first[1], "duplicate": True}
    status, _ = await post(session, keyed_pod, "news", {"data": "next"})
    assert status == 201
    frames = [await recv_type(ws, "message") for _ in range(2)]
    assert [f["data"] for f in frames] == ["once", "next"]  # the retries sent nothing
    assert frames[0]["from"] == {"id": "billing", "name": "Billing"}
    await ws.close()


async def test_an_idempotency_key_of_128_printable_characters_is_taken(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F))[:128].ljust(128, "k")
    first = await post(session, keyed_pod, "news", {"data": 1}, headers={"Idempotency-Key": key})
    again = await post(session, keyed_pod, "news", {"data": 1, "idempotency_key": key})
    assert (first[0], again[0], again[1]["duplicate"]) == (201, 200, True)


async def test_without_idempotency_key_each_request_publishes(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    replies = [await post(session, keyed_pod, "news", {"data": "x"}) for _ in range(2)]
    assert [r[1]["offset"] for r in replies] == [1, 2]


async def test_key_is_required_and_checked(
    keyed_pod: Pod, pod: Pod, session: aiohttp.ClientSession
) -> None:
    assert (await post(session, keyed_pod, "news", {"data": 1}, key=None))[0] == 401
    assert (await post(session, keyed_pod, "news", {"data": 1}, key="wrong"))[0] == 401
    status, reply = await post(session, pod, "news", {"data": 1})  # no key set: off
    assert status == 404
    assert reply["error"] == "disabled"


@pytest.mark.parametrize(
    ("room", "body", "code"),
    [
        ("bad%20room", {"data": 1}, "invalid_room"),
        ("news", {"text": 1}, "missing_data"),
        ("news", [1], "missing_data"),
        ("news", {"data": 1, "from": "me"}, "invalid_from"),
        ("news", {"data": 1, "idempotency_key": "has space"}, "invalid_idempotency_key"),
        ("news", {"data": 1, "idempotency_key": "k" * 129}, "invalid_idempotency_key"),
        ("news", {"data": 1, "idempotency_key": ""}, "invalid_idempotency_key"),
        ("news", {"data": 1, "idempotency_key": "caf\u00e9"}, "invalid_idempotency_key"),
        ("news", {"data": 1, "idempotency_key": 42}, "invalid_idempotency_key"),
    ],
)
async def test_bad_requests_are_refused(
    keyed_pod: Pod, session: aiohttp.ClientSession, room: str, body: Any, code: str
) -> None:
    status, reply = await post(session, keyed_pod, room, body)
    assert (status, reply["error"]) == (400, code)


@pytest.mark.slow
async def test_publish_on_one_pod_reaches_another_and_its_history(
    pod_factory: PodFactory,
    session: aiohttp.ClientSession,
    shared_redis_url: str,
    channel_prefix: str,
) -> None:
    env = redis_pod_env(shared_redis_url, channel_prefix, PUBLISH_API_KEY=KEY)
    a, b = pod_factory(env, name="pod-a"), pod_factory(env, name="pod-b")
    ws, _ = await connect(session, b.ws_url("news"))
    headers = {"Idempotency-Key": "k1"}
    status, reply = await post(session, a, "news", {"data": "across"}, headers=headers)
    assert status == 201
    frame = await recv_type(ws, "message")
    assert (frame["data"], frame["offset"]) == ("across", reply["offset"])
    # A retry on the other pod is still a duplicate: the key lives in Redis.
    status, again = await post(session, b, "news", {"data": "across"}, headers=headers)
    assert (status, again["offset"], again["duplicate"]) == (200, reply["offset"], True)
    late, _ = await connect(session, a.ws_url("news", history="10"))
    assert (await recv_type(late, "sync"))["replayed"] == 1
    assert (await recv_type(late, "message"))["data"] == "across"
    await ws.close()
    await late.close()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


BAD_REQUEST_CODES = {
    "invalid_room",
    "invalid_json",
    "missing_data",
    "invalid_from",
    "invalid_idempotency_key",
    "invalid_data",
}


async def test_deeply_nested_data_is_refused_with_400(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    status, reply = await post(session, keyed_pod, "news", {"data": nested(300)})
    assert status == 400
    assert reply["error"] in BAD_REQUEST_CODES


async def test_the_api_holds_data_to_the_frames_limits_and_a_refusal_takes_no_offset(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    member, _ = await connect(session, keyed_pod.ws_url("depth"))
    for depth in (33, 300):  # a frame stops at 32 too
        status, reply = await post(session, keyed_pod, "depth", {"data": nested(depth)})
        assert (status, reply["error"]) == (400, "invalid_data")
    status, reply = await post(session, keyed_pod, "depth", {"data": nested(32)})
    assert status == 201
    assert reply["offset"] == 1  # the refused ones used up none
    frame = await recv(member)  # the next frame after the welcome: no sync told of a loss
    assert (frame["type"], frame["offset"]) == ("message", 1)
    await member.close()


async def post_raw(session: aiohttp.ClientSession, pod: Pod, body: bytes) -> tuple[int, str]:
    url = f"{pod.base}/api/chat-api/rooms/news/messages"
    headers = {"Authorization": f"Bearer {KEY}"}
    async with asyncio.timeout(10), session.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.text()


def error_code(text: str) -> Any:
    """The ``error`` of a documented error body ``{"error", "message"}``."""
    body = orjson.loads(text)
    assert set(body) == {"error", "message"}, body
    return body["error"]


async def test_bodies_that_are_not_json_are_refused(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    for body in (b"{not json", b"[" * 1100 + b"]" * 1100):  # (beyond the parser's depth)
        status, text = await post_raw(session, keyed_pod, body)
        assert (status, error_code(text)) == (400, "invalid_json"), body[:20]


async def test_a_body_over_max_message_bytes_is_413_too_large(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"PUBLISH_API_KEY": KEY, "MAX_MESSAGE_BYTES": "1024"})
    status, text = await post_raw(session, pod, b'{"data": "' + b"x" * 1100 + b'"}')
    assert (status, error_code(text)) == (413, "too_large")
    status, _ = await post_raw(session, pod, b'{"data": "' + b"x" * 900 + b'"}')
    assert status == 201


async def test_a_body_over_64_kib_is_413_too_large_in_json(
    keyed_pod: Pod, session: aiohttp.ClientSession
) -> None:
    status, text = await post_raw(session, keyed_pod, b'{"data": "' + b"x" * 70000 + b'"}')
    assert status == 413
    assert error_code(text) == "too_large"
