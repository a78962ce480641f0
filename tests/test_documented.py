"""Claims of README.md and docs/protocol.md that no other test held to,
one test each, against real local-only pods.

Each test names the claim it checks; the checklist of every claim and its
test is in the report of issue 12 (item 7).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import pytest
from yarl import URL

from .conftest import PodFactory
from .security_support import handshake
from .support import DEFAULT_TIMEOUT, Pod, connect, get_json, recv, recv_type, send

EPOCH = re.compile(r"[0-9a-f]{16}")


async def stats(session: aiohttp.ClientSession, pod: Pod) -> dict[str, Any]:
    result: dict[str, Any] = await get_json(session, f"{pod.base}/api/chat-api/ws/stats")
    return result


# -- frames ------------------------------------------------------------------------------


async def test_message_and_ack_fields_as_documented(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    """Room messages: ``ts`` in ms since the epoch, ``epoch`` 16 hex digits;
    messages to everyone (``room: null``) carry no offset/epoch, nor do their
    acks; the welcome states the default limits."""
    ws, welcome = await connect(session, pod.ws_url("general"))
    assert welcome["limits"] == {"max_message_bytes": 65536, "max_rooms": 10}
    before = time.time_ns() // 1_000_000
    await send(ws, {"type": "message", "data": 1, "ref": 7})
    frame = await recv_type(ws, "message")
    after = time.time_ns() // 1_000_000
    assert before <= frame["ts"] <= after
    assert EPOCH.fullmatch(frame["epoch"]), frame["epoch"]
    assert frame["offset"] == 1
    await recv_type(ws, "ack")

    g, _ = await connect(session, pod.ws_url())
    await send(g, {"type": "message", "data": "all", "ref": "g1"})
    frame = await recv_type(g, "message")
    assert set(frame) == {"type", "room", "id", "from", "ts", "data"}
    assert frame["room"] is None
    ack = await recv_type(g, "ack")
    assert ack == {"type": "ack", "ref": "g1", "id": frame["id"], "room": None}
    await ws.close()
    await g.close()


async def test_stats_have_every_documented_field(pod: Pod, session: aiohttp.ClientSession) -> None:
    ws, _ = await connect(session, pod.ws_url("general"))
    s = await stats(session, pod)
    assert set(s) >= {
        "pod", "uptime_s", "draining", "connections", "rooms", "room_count", "messages",
        "errors_sent", "slow_client_disconnects", "refused", "rate_limited", "policy_closes",
        "broadcaster", "timeline", "presence",
    }  # fmt: skip
    assert set(s["connections"]) == {"open", "accepted"}
    assert set(s["messages"]) == {"received", "broadcasts", "delivered"}
    assert set(s["policy_closes"]) == {"rate_limit", "token_expired"}
    assert set(s["broadcaster"]) >= {"kind", "state", "published", "subscribed_rooms"}
    assert (s["broadcaster"]["kind"], s["broadcaster"]["state"]) == ("memory", "local-only")
    assert set(s["timeline"]) == {
        "rooms", "rooms_holding", "held", "entries", "delivered", "duplicates_dropped",
        "gap_repairs", "lost", "epoch_changes", "replayed", "history_reads", "recovered",
        "unstamped", "unknown", "memory_bytes", "memory_shed",
    }  # fmt: skip
    assert set(s["presence"]) == {"rooms", "members", "events_sent", "failures", "ttl_s"}
    assert s["presence"]["ttl_s"] == 15.0  # PRESENCE_TTL's default
    assert (s["pod"], s["draining"], s["room_count"]) == (pod.name, False, 1)
    await ws.close()


async def test_a_ref_longer_than_128_characters_is_invalid_frame(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, pod.ws_url("general"))
    await send(ws, {"type": "ping", "ref": "r" * 128})
    assert await recv_type(ws, "pong") == {"type": "pong", "ref": "r" * 128}
    await send(ws, {"type": "ping", "ref": "r" * 129})
    assert (await recv_type(ws, "error"))["code"] == "invalid_frame"
    await ws.close()


async def test_a_join_with_bad_catch_up_fields_is_invalid_frame(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, pod.ws_url())
    cases: list[dict[str, Any]] = [
        {"since": -1},
        {"since": "3"},
        {"since": 1.5},
        {"since": True},
        {"history": -2},
        {"history": "x"},
        {"since": 1, "epoch": "e" * 65},
        {"since": 1, "epoch": 7},
    ]
    for n, bad in enumerate(cases):
        await send(ws, {"type": "join", "room": "x", "ref": n, **bad})
        error = await recv_type(ws, "error")
        assert (error["code"], error["ref"]) == ("invalid_frame", n), bad
    assert (await stats(session, pod))["rooms"] == {}
    await ws.close()


# -- names ------------------------------------------------------------------------------


async def test_stats_is_a_room_for_join_frames_only(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    """The URL /ws/stats is the stats endpoint; a join frame may enter room
    ``stats``."""
    s = await get_json(session, pod.ws_url("stats").replace("ws:", "http:"))
    assert s["pod"] == pod.name
    ws, _ = await connect(session, pod.ws_url())
    await send(ws, {"type": "join", "room": "stats", "ref": 1})
    assert (await recv_type(ws, "joined"))["room"] == "stats"
    await send(ws, {"type": "message", "room": "stats", "data": "hi"})
    assert (await recv_type(ws, "message"))["room"] == "stats"
    await ws.close()


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("Ada%E2%80%8B%20%20Lovelace%07", "Ada Lovelace"),  # invisible, control, spaces
        ("x" * 40, "x" * 32),  # at most 32 characters
        ("%E2%80%8B%01", None),  # nothing left: a guest name
        ("", None),
    ],
)
async def test_guest_names_are_cleaned(
    pod: Pod, session: aiohttp.ClientSession, given: str, shown: str | None
) -> None:
    url = f"ws://127.0.0.1:{pod.port}/api/chat-api/ws/general?name={given}"
    ws, welcome = await connect(session, URL(url, encoded=True))
    user = welcome["user"]
    assert user["id"] == f"guest-{welcome['connection_id']}"
    if shown is None:
        assert re.fullmatch(r"guest-[0-9a-f]{4}-[0-9a-f]+", user["name"]), user
    else:
        assert user["name"] == shown
    await ws.close()


# -- HTTP before the upgrade -------------------------------------------------------------


async def test_a_request_that_is_not_a_websocket_upgrade_gets_400(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    for path in ("/api/chat-api/ws", "/api/chat-api/ws/general"):
        async with asyncio.timeout(DEFAULT_TIMEOUT), session.get(pod.base + path) as resp:
            assert resp.status == 400, path
    # while the same request as an upgrade is taken
    assert (await handshake(session, pod.ws_url("general")))[0] == 101


async def test_host_sets_the_listening_address(pod_factory: PodFactory) -> None:
    pod = pod_factory({"HOST": "127.0.0.2"})
    line = pod.wait_for_log("listening on")
    assert f"http://127.0.0.2:{pod.port}" in line
    async with (
        aiohttp.ClientSession() as session,
        asyncio.timeout(DEFAULT_TIMEOUT),
        session.get(f"http://127.0.0.2:{pod.port}/healthz") as resp,
    ):
        assert resp.status == 200
    with pytest.raises(aiohttp.ClientConnectionError):  # not on 127.0.0.1
        async with (
            aiohttp.ClientSession() as session,
            asyncio.timeout(DEFAULT_TIMEOUT),
            session.get(f"http://127.0.0.1:{pod.port}/healthz"),
        ):
            pass


# -- the default rate limit ---------------------------------------------------------------


async def test_the_default_rate_limit_lets_a_burst_of_100_through_then_limits(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    """RATE_LIMIT_BURST 100, RATE_LIMIT_PER_SECOND 50, RATE_LIMIT_MAX_REFUSED
    100: 130 frames at once are 100 taken (a few more as tokens refill), the
    rest refused with rate_limited, and no close."""
    ws, _ = await connect(session, pod.ws_url("general"))
    for n in range(130):
        await send(ws, {"type": "message", "data": n, "ref": n})
    acks: list[int] = []
    limited: list[int] = []
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while len(acks) + len(limited) < 130:
            frame = await recv(ws)
            assert isinstance(frame, dict), frame
            if frame["type"] == "ack":
                acks.append(frame["ref"])
            elif frame["type"] == "error":
                assert frame["code"] == "rate_limited"
                limited.append(frame["ref"])
    assert acks[:100] == list(range(100))
    assert 100 <= len(acks) <= 115, len(acks)
    assert sorted(acks + limited) == list(range(130))
    # Still open: the next frame is answered (with a pong once a token refilled).
    await send(ws, {"type": "ping", "ref": "open"})
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while (frame := await recv(ws))["type"] in ("message", "member_joined"):
            pass
    assert frame in (
        {"type": "pong", "ref": "open"},
        {**frame, "type": "error", "code": "rate_limited", "ref": "open"},
    ), frame
    await ws.close()
