"""``POST /api/chat-api/rooms/{room}/messages``: a backend publishes into a room.

Protected by ``PUBLISH_API_KEY`` (sent as ``Authorization: Bearer <key>``);
the route answers 404 while no key is set. An optional idempotency key
(``Idempotency-Key`` header or ``idempotency_key`` field) makes a retried
request publish once: the retry gets the first one's offset, with
``duplicate: true``.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from realtime import Identity, Message, Node, ProtocolError, Stamp, Unstored
from realtime.core.access import clean_name
from realtime.core.protocol import check_data, validate_room

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


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None if it is over ``limit`` bytes (then not
    read further)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def publish_handler(
    node: Node, api_key: str, *, max_bytes: int, read_timeout: float = 10.0
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
        try:
            async with asyncio.timeout(read_timeout):
                raw = await _read_body(request, max_bytes)
        except TimeoutError:
            return _problem(408, "timeout", f"the body took longer than {read_timeout:g} s")
        except ConnectionError:  # the client went away mid-body: nobody to answer
            return _problem(400, "incomplete", "the connection was lost")
        if raw is None:
            return _problem(413, "too_large", f"the body is over {max_bytes} bytes")
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _problem(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(body, dict) or "data" not in body:
            return _problem(400, "missing_data", 'send {"data": ..., "from"?: {"id", "name"}}')
        try:
            check_data(body["data"])  # the same limits as a WebSocket message
        except ProtocolError as exc:
            return _problem(400, "invalid_data", exc.message)
        sender = _sender(body.get("from"))
        if sender is None:
            return _problem(400, "invalid_from", '\'from\' must be {"id": str, "name": str}')
        key = request.headers.get("Idempotency-Key") or body.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key)):
            return _problem(
                400, "invalid_idempotency_key", "1-128 printable ASCII characters, no spaces"
            )
        message = Message(
            id=node.message_id(room, key),  # stable across the retries of a key
            room=room,
            sender=sender,
            ts=time.time_ns() // 1_000_000,
            data=body["data"],
        )
        done: asyncio.Future[Stamp | Unstored] = asyncio.get_running_loop().create_future()

        def appended(outcome: Stamp | Unstored) -> None:
            if not done.done():
                done.set_result(outcome)

        node.publish(message, appended, key=key, local_fallback=False, scope="api")
        try:
            outcome = await asyncio.wait_for(asyncio.shield(done), STORE_TIMEOUT)
        except TimeoutError:
            outcome = Unstored.UNKNOWN
        if outcome is Unstored.CONFLICT:
            return _problem(
                409, "idempotency_conflict", "this key was used for another message in this room"
            )
        if not isinstance(outcome, Stamp):
            return _problem(503, "unavailable", "the message could not be stored; retry")
        stamp = outcome
        reply = {
            "id": message.id,
            "room": room,
            "offset": stamp.offset,
            "epoch": stamp.epoch,
            "duplicate": stamp.duplicate,
        }
        if not stamp.replicated:
            reply["replicated"] = False
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
