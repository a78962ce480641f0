"""The python-socketio peer: the same chat shape, in its documented set-up.

``AsyncServer`` with ``AsyncRedisManager`` (so pods share rooms through
Redis), wrapped in ``ASGIApp`` and served by uvicorn. A client joins the room
named by the ``room`` query parameter on connect; a ``message`` event is
stamped (id, sender, ms timestamp) and emitted to the whole room, sender
included, and acknowledged with the message id -- what chat-api does.

    python bench/peers/socketio_server.py --port 8001 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any
from urllib.parse import parse_qs

import socketio
import uvicorn


def make_app(redis_url: str, pod_id: str) -> socketio.ASGIApp:
    sio = socketio.AsyncServer(
        async_mode="asgi",
        client_manager=socketio.AsyncRedisManager(redis_url),
        cors_allowed_origins=[],
    )
    rooms: dict[str, str] = {}
    ids = itertools.count(1)
    prefix = f"{pod_id}-{os.urandom(3).hex()}"

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: object = None) -> None:
        room = parse_qs(environ.get("QUERY_STRING", "")).get("room", ["general"])[0]
        rooms[sid] = room
        await sio.enter_room(sid, room)

    @sio.event
    async def disconnect(sid: str, *args: object) -> None:
        rooms.pop(sid, None)

    @sio.event
    async def message(sid: str, payload: dict[str, Any]) -> dict[str, str]:
        room = rooms.get(sid, "general")
        message_id = f"{prefix}-{next(ids):x}"
        await sio.emit(
            "message",
            {
                "room": room,
                "id": message_id,
                "from": sid,
                "ts": time.time_ns() // 1_000_000,
                "data": payload.get("data"),
            },
            room=room,
        )
        return {"id": message_id}

    return socketio.ASGIApp(sio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--pod-id", default="sio")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.redis, args.pod_id),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
