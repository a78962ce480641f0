"""``POST /api/chat-api/users/{user}/messages`` and ``…/disconnect``: a
backend reaches one user on every pod.

Both are behind ``PUBLISH_API_KEY`` like the publish API, and both are
best effort (``realtime.users``): nothing is stored, a user with no open
connection gets nothing. An ``Idempotency-Key`` makes a retry (on any pod,
within ``HISTORY_TTL``) do nothing and answer ``200`` with the first
request's id and ``"duplicate": true``; the same key with another body
answers ``409``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from realtime import BroadcastError, Message, Node, ProtocolError
from realtime.core.protocol import check_data
from realtime.users import MAX_BAN_SECONDS, USER_CLOSE_CODES

from .common import idempotency_key, problem, read_json, refuse_key
from .publish import sender_of

__all__ = ["DEFAULT_CLOSE_CODE", "MAX_REASON_BYTES", "disconnect_handler", "user_message_handler"]

MAX_USER_LENGTH = 128
DEFAULT_CLOSE_CODE = 4000
DEFAULT_REASON = "disconnected by the server"
MAX_REASON_BYTES = 123
"""What fits in a close frame (125 bytes, 2 of them the code)."""

Handler = Callable[[web.Request], Awaitable[web.Response]]
Act = Callable[[str], None]
"""Act on a valid request, given its new id."""
Check = Callable[[str, dict[str, Any]], web.Response | Act]
"""Validate a request's body for ``user``: the error answer, or how to act."""


def user_message_handler(
    node: Node, api_key: str, *, max_bytes: int, read_timeout: float = 10.0
) -> Handler:
    def check(user: str, body: dict[str, Any]) -> web.Response | Act:
        if "data" not in body:
            return problem(400, "missing_data", 'send {"data": ..., "from"?: {"id", "name"}}')
        try:
            check_data(body["data"])
        except ProtocolError as exc:
            return problem(400, "invalid_data", exc.message)
        sender = sender_of(body.get("from"))
        if sender is None:
            return problem(400, "invalid_from", '\'from\' must be {"id": str, "name": str}')

        def send(new_id: str) -> None:
            ts = time.time_ns() // 1_000_000
            node.users.send(user, Message(new_id, None, sender, ts, body["data"]))
            node.counters.published["user"] = node.counters.published.get("user", 0) + 1

        return send

    return _handler(node, api_key, "message", check, max_bytes, read_timeout)


def disconnect_handler(
    node: Node, api_key: str, *, max_bytes: int, read_timeout: float = 10.0
) -> Handler:
    def check(user: str, body: dict[str, Any]) -> web.Response | Act:
        code = body.get("code", DEFAULT_CLOSE_CODE)
        if isinstance(code, bool) or not isinstance(code, int) or code not in USER_CLOSE_CODES:
            return problem(400, "invalid_code", "'code' must be an integer from 4000 to 4999")
        reason = body.get("reason", DEFAULT_REASON)
        if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON_BYTES:
            return problem(
                400, "invalid_reason", f"'reason' must be text of at most {MAX_REASON_BYTES} bytes"
            )
        ban = body.get("ban_seconds", 0)
        if (
            isinstance(ban, bool)
            or not isinstance(ban, int | float)
            or not 0 <= ban <= MAX_BAN_SECONDS
        ):
            return problem(
                400, "invalid_ban", f"'ban_seconds' must be a number from 0 to {MAX_BAN_SECONDS:g}"
            )
        return lambda _: node.users.disconnect(user, code, reason, float(ban))

    return _handler(node, api_key, "disconnect", check, max_bytes, read_timeout)


def _handler(
    node: Node, api_key: str, op: str, check: Check, max_bytes: int, read_timeout: float
) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        refused = refuse_key(request, api_key)
        if refused is not None:
            return refused
        user = request.match_info["user"]
        if not 0 < len(user) <= MAX_USER_LENGTH:
            return problem(400, "invalid_user", f"a user id is 1-{MAX_USER_LENGTH} characters")
        body = await read_json(request, max_bytes, read_timeout)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body, dict):
            return problem(400, "invalid_body", "the body must be a JSON object")
        key = idempotency_key(request, body)
        if isinstance(key, web.Response):
            return key
        act = check(user, body)
        if isinstance(act, web.Response):
            return act
        if not node.link_up:
            return problem(503, "unavailable", "other pods cannot be reached now; retry")
        new_id = node.new_message_id()
        if key is not None:
            fields = {k: v for k, v in body.items() if k != "idempotency_key"}
            digest = hashlib.blake2b(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()
            try:
                held = await node.backend.claim(
                    f"users\0{op}\0{user}\0{key}", f"{new_id} {digest}", node.settings.history_ttl
                )
            except BroadcastError:
                return problem(
                    503, "unavailable", "the idempotency key could not be checked; retry"
                )
            if held is not None:
                first_id, _, first_digest = held.partition(" ")
                if first_digest != digest:
                    return problem(
                        409, "idempotency_conflict", "this key was used for another request"
                    )
                return _answer(200, first_id, user, duplicate=True)
        act(new_id)
        return _answer(202, new_id, user, duplicate=False)

    return handle


def _answer(status: int, message_id: str, user: str, *, duplicate: bool) -> web.Response:
    body = {"id": message_id, "user": user, "duplicate": duplicate}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
