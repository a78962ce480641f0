"""``POST /api/chat-api/rooms/{room}/messages``: a backend publishes into a room.

Protected by ``PUBLISH_API_KEY`` (sent as ``Authorization: Bearer <key>``);
the route answers 404 while no key is set. An optional idempotency key
(``Idempotency-Key`` header or ``idempotency_key`` field) makes a retried
request publish once: the retry gets the first one's offset, with
``duplicate: true``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from realtime import Identity, Message, Node, ProtocolError, Stamp, Unstored
from realtime.core.access import clean_name
from realtime.core.protocol import check_data, validate_room

from .common import idempotency_key, problem, read_json, refuse_key

__all__ = ["publish_handler", "sender_of"]

SERVER_IDENTITY = Identity(id="server", name="server")
STORE_TIMEOUT = 10.0


def publish_handler(
    node: Node, api_key: str, *, max_bytes: int, read_timeout: float = 10.0
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def publish(request: web.Request) -> web.Response:
        refused = refuse_key(request, api_key)
        if refused is not None:
            return refused
        try:
            room = validate_room(request.match_info["room"])
        except ProtocolError as exc:
            return problem(400, exc.code, exc.message)
        body = await read_json(request, max_bytes, read_timeout)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body, dict) or "data" not in body:
            return problem(400, "missing_data", 'send {"data": ..., "from"?: {"id", "name"}}')
        try:
            check_data(body["data"])  # the same limits as a WebSocket message
        except ProtocolError as exc:
            return problem(400, "invalid_data", exc.message)
        sender = sender_of(body.get("from"))
        if sender is None:
            return problem(400, "invalid_from", '\'from\' must be {"id": str, "name": str}')
        key = idempotency_key(request, body)
        if isinstance(key, web.Response):
            return key
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
            return problem(
                409, "idempotency_conflict", "this key was used for another message in this room"
            )
        if not isinstance(outcome, Stamp):
            return problem(503, "unavailable", "the message could not be stored; retry")
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


def sender_of(raw: object) -> Identity | None:
    """The ``from`` of an API request (None: invalid); the server by default."""
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
