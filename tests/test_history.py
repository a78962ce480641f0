"""Room offsets, history on join and resume, against real local-only pods."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from .conftest import PodFactory
from .security_support import handshake
from .support import Pod, connect, eventually, recv, recv_type, send

pytestmark = pytest.mark.contract


async def messages(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict[str, Any]]:
    """The next ``n`` message frames (other frames are skipped)."""
    return [await recv_type(ws, "message") for _ in range(n)]


async def send_many(ws: aiohttp.ClientWebSocketResponse, texts: list[str]) -> None:
    for text in texts:
        await send(ws, {"type": "message", "data": text})


async def test_room_messages_carry_consecutive_offsets_and_acks_say_which(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, pod.ws_url("offsets", history="10"))
    sync = await recv_type(ws, "sync")
    assert sync == {
        "type": "sync",
        "room": "offsets",
        "epoch": None,
        "offset": 0,
        "replayed": 0,
        "complete": True,
    }
    await send(ws, {"type": "message", "data": "a", "ref": 1})
    await send(ws, {"type": "message", "data": "b", "ref": 2})
    frames = [await recv(ws) for _ in range(4)]
    got = [f for f in frames if f["type"] == "message"]
    acks = [f for f in frames if f["type"] == "ack"]
    assert [m["offset"] for m in got] == [1, 2]
    epoch = got[0]["epoch"]
    assert isinstance(epoch, str)
    assert got[1]["epoch"] == epoch
    assert [(a["ref"], a["offset"], a["epoch"]) for a in acks] == [(1, 1, epoch), (2, 2, epoch)]
    await ws.close()


async def test_history_on_join_then_live(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("hist"))
    await send_many(a, [f"m{i}" for i in range(1, 6)])
    await messages(a, 5)
    b, _ = await connect(session, pod.ws_url("hist", history="3"))
    sync = await recv_type(b, "sync")
    assert (sync["replayed"], sync["first"], sync["offset"], sync["complete"]) == (3, 3, 5, True)
    assert [m["data"] for m in await messages(b, 3)] == ["m3", "m4", "m5"]
    await send(a, {"type": "message", "data": "m6"})
    assert (await recv_type(b, "message"))["offset"] == 6
    await a.close()
    await b.close()


async def test_resume_gets_exactly_what_was_missed(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    sender, _ = await connect(session, pod.ws_url("resume"))
    reader, _ = await connect(session, pod.ws_url("resume"))
    await send_many(sender, ["1", "2", "3"])
    seen = await messages(reader, 3)
    last, epoch = seen[-1]["offset"], seen[-1]["epoch"]
    await reader.close()
    await send_many(sender, ["4", "5", "6", "7"])
    await messages(sender, 7)
    back, _ = await connect(session, pod.ws_url("resume", since=str(last), epoch=epoch))
    sync = await recv_type(back, "sync")
    assert (sync["complete"], sync["replayed"], sync["offset"]) == (True, 4, 7)
    assert [m["data"] for m in await messages(back, 4)] == ["4", "5", "6", "7"]
    await send(sender, {"type": "message", "data": "8"})
    assert (await recv_type(back, "message"))["data"] == "8"
    await sender.close()
    await back.close()


async def test_resume_with_a_join_frame_on_another_connection(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    sender, _ = await connect(session, pod.ws_url("later"))
    await send_many(sender, ["1", "2", "3"])
    first = await messages(sender, 3)
    ws, _ = await connect(session, pod.ws_url())
    await send(ws, {"type": "join", "room": "later", "since": 1, "epoch": first[0]["epoch"]})
    assert (await recv_type(ws, "joined"))["room"] == "later"
    sync = await recv_type(ws, "sync")
    assert (sync["complete"], sync["replayed"]) == (True, 2)
    assert [m["offset"] for m in await messages(ws, 2)] == [2, 3]
    await sender.close()
    await ws.close()


async def test_window_exceeded_is_told(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"HISTORY_LENGTH": "5"})
    sender, _ = await connect(session, pod.ws_url("small"))
    await send_many(sender, [str(i) for i in range(1, 13)])
    got = await messages(sender, 12)
    back, _ = await connect(session, pod.ws_url("small", since="2", epoch=got[0]["epoch"]))
    sync = await recv_type(back, "sync")
    assert sync["complete"] is False
    assert sync["reason"] == "window_exceeded"
    assert (sync["replayed"], sync["first"]) == (5, 8)
    assert [m["offset"] for m in await messages(back, 5)] == [8, 9, 10, 11, 12]
    await sender.close()
    await back.close()


async def test_epoch_change_after_a_restart_is_told(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(session, pod.ws_url("reboot"))
    await send(ws, {"type": "message", "data": "before"})
    before = await recv_type(ws, "message")
    await ws.close()
    pod.stop()
    pod.restart()
    ws, _ = await connect(session, pod.ws_url("reboot"))
    await send(ws, {"type": "message", "data": "after"})
    await recv_type(ws, "message")
    back, _ = await connect(
        session, pod.ws_url("reboot", since=str(before["offset"]), epoch=before["epoch"])
    )
    sync = await recv_type(back, "sync")
    assert sync["complete"] is False
    assert sync["reason"] == "epoch_changed"
    assert sync["epoch"] != before["epoch"]
    # What the new epoch has kept is sent, from its start.
    assert [m["data"] for m in await messages(back, sync["replayed"])] == ["after"]
    await ws.close()
    await back.close()


async def test_bad_catchup_parameters_are_refused(pod: Pod, session: aiohttp.ClientSession) -> None:
    # Real upgrade requests: a plain GET is refused with 400 whatever its query.
    assert (await handshake(session, pod.ws_url("x", since="1", epoch="e")))[0] == 101
    assert (await handshake(session, pod.ws_url("x", history="0")))[0] == 101
    for query in (
        {"since": "-1"},
        {"since": "1.5"},
        {"history": "x"},
        {"history": "1e3"},
        {"since": "1", "history": "2"},
        {"since": "1", "epoch": "e" * 65},
    ):
        status, body, _ = await handshake(session, pod.ws_url("x", **query))
        assert status == 400, (query, body)
    ws, _ = await connect(session, pod.ws_url())
    await send(ws, {"type": "join", "room": "x", "since": 1, "history": 2, "ref": 9})
    error = await recv_type(ws, "error")
    assert (error["code"], error["ref"]) == ("invalid_frame", 9)
    await ws.close()


async def test_history_on_join_during_traffic_has_no_gap_or_duplicate(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"RATE_LIMIT_PER_SECOND": "0"})  # a flood on purpose
    sender, _ = await connect(session, pod.ws_url("busy"))
    midway = asyncio.Event()  # the flood is under way: joiners come in now
    synced = asyncio.Event()  # every joiner has its sync: the flood may end
    after_sync, cap = 100, 5000

    async def flood() -> int:
        """Send until every joiner has its sync frame, then ``after_sync``
        more: the catch-ups surely happen during the traffic."""
        sent = extra = 0
        while sent < cap and extra < after_sync:
            sent += 1
            await send(sender, {"type": "message", "data": sent})
            if synced.is_set():
                extra += 1
            if sent % 20 == 0:
                await asyncio.sleep(0.001)  # steady traffic, not one burst
        return sent

    async def join() -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
        ws, _ = await connect(session, pod.ws_url("busy", history="50"))
        return ws, await recv_type(ws, "sync")

    async def rest(ws: aiohttp.ClientWebSocketResponse, sync: dict[str, Any]) -> list[int]:
        got = [m["offset"] for m in await messages(ws, sync["replayed"])]
        while not got or got[-1] < total:
            frame = await recv(ws)
            if frame.get("type") == "message":
                got.append(frame["offset"])
        return got

    async def watch() -> None:
        """``midway`` once the pod has stored (and echoed) message 100."""
        while True:
            frame = await recv(sender)
            if frame.get("type") == "message" and frame["data"] == 100:
                midway.set()
                return

    flooding = asyncio.create_task(flood())
    async with asyncio.timeout(30):
        await watch()
        await midway.wait()
        joined = await asyncio.gather(*(join() for _ in range(4)))
        synced.set()
        total = await flooding
        results = await asyncio.gather(*(rest(ws, sync) for ws, sync in joined))
    assert total < cap
    for (ws, sync), got in zip(joined, results, strict=True):
        # The catch-up started mid-flood: after 100 messages, before the last.
        assert 100 <= sync["offset"] < total, (sync, total)
        assert (sync["replayed"], sync["first"]) == (50, sync["offset"] - 49)
        assert got == list(range(sync["first"], total + 1))
        await ws.close()
    await sender.close()


async def test_history_is_capped_at_history_length(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    pod = pod_factory({"HISTORY_LENGTH": "5"})
    sender, _ = await connect(session, pod.ws_url("capped"))
    await send_many(sender, [str(i) for i in range(1, 9)])
    await messages(sender, 8)
    ws, _ = await connect(session, pod.ws_url("capped", history="50"))
    sync = await recv_type(ws, "sync")
    assert (sync["replayed"], sync["first"], sync["offset"]) == (5, 4, 8)
    assert [m["data"] for m in await messages(ws, 5)] == ["4", "5", "6", "7", "8"]
    # The same through a join frame.
    await send(ws, {"type": "leave", "room": "capped"})
    await recv_type(ws, "left")
    await send(ws, {"type": "join", "room": "capped", "history": 1000})
    sync = await recv_type(ws, "sync")
    assert (sync["replayed"], sync["first"]) == (5, 4)
    assert [m["offset"] for m in await messages(ws, 5)] == [4, 5, 6, 7, 8]
    await sender.close()
    await ws.close()


@pytest.mark.parametrize(
    "query",
    [
        "since=\u00b2",  # str.isdigit() says yes, int() refuses: was HTTP 500
        "history=\u00b2",
        "history=\u0663",  # an Arabic-Indic 3: int() takes it; not ours
        "since=1" + "0" * 15,  # beyond 15 digits
    ],
)
async def test_non_ascii_digits_in_catchup_parameters_are_refused_with_400(
    pod: Pod, session: aiohttp.ClientSession, query: str
) -> None:
    name, _, value = query.partition("=")
    status, body, _ = await handshake(session, pod.ws_url("x", **{name: value}))
    assert status == 400, body


async def test_resume_ahead_of_the_room_is_unknown_offset(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    sender, _ = await connect(session, pod.ws_url("ahead"))
    await send_many(sender, ["1", "2", "3"])
    epoch = (await messages(sender, 3))[0]["epoch"]
    ws, _ = await connect(session, pod.ws_url("ahead", since="99", epoch=epoch))
    sync = await recv_type(ws, "sync")
    assert (sync["complete"], sync["reason"], sync["replayed"]) == (False, "unknown_offset", 0)
    await send(sender, {"type": "message", "data": "4"})
    assert (await recv_type(ws, "message"))["offset"] == 4  # live from here
    await sender.close()
    await ws.close()


async def test_since_0_without_epoch_gets_everything_kept(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    sender, _ = await connect(session, pod.ws_url("fresh"))
    await send_many(sender, ["1", "2", "3"])
    await messages(sender, 3)
    ws, _ = await connect(session, pod.ws_url("fresh", since="0"))
    sync = await recv_type(ws, "sync")
    assert (sync["complete"], sync["replayed"], sync["first"], sync["offset"]) == (True, 3, 1, 3)
    assert [m["data"] for m in await messages(ws, 3)] == ["1", "2", "3"]
    await sender.close()
    await ws.close()


@pytest.mark.slow
async def test_a_rooms_history_expires_history_ttl_after_its_last_message(
    pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    ttl = 2.0
    pod = pod_factory({"HISTORY_TTL": str(ttl)})
    ws, _ = await connect(session, pod.ws_url("brief"))
    await send(ws, {"type": "message", "data": "old"})
    sent_at = time.monotonic()
    old = await recv_type(ws, "message")
    await ws.close()

    async def resume() -> dict[str, Any]:
        back, _ = await connect(session, pod.ws_url("brief", since="0", epoch=old["epoch"]))
        sync = await recv_type(back, "sync")
        await back.close()
        return sync

    # Kept at first...
    assert (await resume())["replayed"] == 1
    # ...and gone once HISTORY_TTL has passed (not before).

    async def expired() -> bool:
        return (await resume())["epoch"] is None

    await eventually(expired, timeout=ttl + 10, interval=0.2)
    assert time.monotonic() - sent_at >= ttl * 0.9
    # The next message starts a new epoch at offset 1.
    ws, _ = await connect(session, pod.ws_url("brief"))
    await send(ws, {"type": "message", "data": "new"})
    new = await recv_type(ws, "message")
    assert new["offset"] == 1
    assert new["epoch"] != old["epoch"]
    await ws.close()
