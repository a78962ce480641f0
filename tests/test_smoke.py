"""The two-client example from the README, against a real pod."""

from __future__ import annotations

import aiohttp

from .support import Pod, connect, recv_type, send


async def test_two_clients_in_a_room_both_receive(pod: Pod, session: aiohttp.ClientSession) -> None:
    a, _ = await connect(session, pod.ws_url("general"))
    b, _ = await connect(session, pod.ws_url("general"))
    await send(a, {"type": "message", "data": {"text": "hi"}})
    for ws in (a, b):
        frame = await recv_type(ws, "message")
        assert frame["room"] == "general"
        assert frame["data"] == {"text": "hi"}
    await a.close()
    await b.close()
