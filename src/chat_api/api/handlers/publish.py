"""``POST /api/chat-api/rooms/{room}/messages``: a backend publishes into a room.

Protected by ``PUBLISH_API_KEY`` (sent as ``Authorization: Bearer <key>``);
the route answers 404 while no key is set. An optional idempotency key
(``Idempotency-Key`` header or ``idempotency_key`` field) makes a retried
request publish once: the retry gets the first one's offset, with
``duplicate: true``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from realtime import Identity, Message, Node, ProtocolError, Stamp
from realtime.core.access import clean_name
from realtime.core.protocol import validate_room

__all__ = ["publish_handler"]

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")
SERVER_IDENTITY = Identity(id="server", name="server")
STORE_TIMEOUT = 10.0


def _problem(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "message": message}),
        content_type="application/json",
        headers=headers,
    )


def publish_handler(
    node: Node, api_key: str, *, max_bytes: int
) -> Callable[[web.Request], Awaitable[web.Response]]:
    expected = f"Bearer {api_key}".encode()

    async def publish(request: web.Request) -> web.Response:
        if not api_key:
            return _problem(404, "disabled", "the publish API is off: set PUBLISH_API_KEY")
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _problem(
                401, "unauthorized", "send 'Authorization: Bearer <PUBLISH_API_KEY>'",
                **{"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        try:
            room = validate_room(request.match_info["room"])
        except ProtocolError as exc:
            return _problem(400, exc.code, exc.message)
        raw = await request.read()
        if len(raw) > max_bytes:
            return _problem(413, "too_large", f"the body is over {max_bytes} bytes")
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _problem(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(body, dict) or "data" not in body:
            return _problem(400, "missing_data", 'send {"data": ..., "from"?: {"id", "name"}}')
        sender = _sender(body.get("from"))
        if sender is None:
            return _problem(400, "invalid_from", '\'from\' must be {"id": str, "name": str}')
        key = request.headers.get("Idempotency-Key") or body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key)):
            return _problem(
                400, "invalid_idempotency_key", "1-128 printable ASCII characters, no spaces"
            )
        if key is None:
            message_id = node.new_message_id()
        else:  # the same for every retry, so the id a client sees is stable
            message_id = "k-" + hashlib.sha256(f"{room}\0{key}".encode()).hexdigest()[:20]
        message = Message(
            id=message_id,
            room=room,
            sender=sender,
            ts=time.time_ns() // 1_000_000,
            data=body["data"],
        )
        done: asyncio.Future[Stamp | None] = asyncio.get_running_loop().create_future()

        def stamped(stamp: Stamp | None) -> None:
            if not done.done():
                done.set_result(stamp)

        node.publish(message, stamped, key=key, local_fallback=False)
        try:
            stamp = await asyncio.wait_for(asyncio.shield(done), STORE_TIMEOUT)
        except TimeoutError:
            stamp = None
        if stamp is None:
            return _problem(503, "unavailable", "the message could not be stored; retry")
        reply = {
            "id": message_id,
            "room": room,
            "offset": stamp.offset,
            "epoch": stamp.epoch,
            "duplicate": stamp.duplicate,
        }
        return web.Response(
            status=200 if stamp.duplicate else 201,
            body=orjson.dumps(reply),
            content_type="application/json",
        )

    return publish


def _sender(raw: object) -> Identity | None:
    if raw is None:
        return SERVER_IDENTITY
    if not isinstance(raw, dict):
        return None
    user_id, name = raw.get("id"), raw.get("name")
    if not isinstance(user_id, str) or not 0 < len(user_id) <= 128:
        return None
    if not isinstance(name, str):
        return None
    return Identity(id=user_id, name=clean_name(name) or user_id[:32])
