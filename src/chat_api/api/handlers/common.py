"""What the HTTP API's handlers share: the bearer key, the body, the
idempotency key, and error answers (``{"error": code, "message": text}``)."""

from __future__ import annotations

import asyncio
import hmac
import re
from typing import Any

import orjson
from aiohttp import web

__all__ = ["IDEMPOTENCY_KEY", "idempotency_key", "problem", "read_json", "refuse_key"]

IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")


def problem(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "message": message}),
        content_type="application/json",
        headers=headers,
    )


def refuse_key(request: web.Request, api_key: str) -> web.Response | None:
    """The answer to a request without ``Authorization: Bearer <api_key>``
    (404 while no key is set); None when the key is right."""
    if not api_key:
        return problem(404, "disabled", "the publish API is off: set PUBLISH_API_KEY")
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
        return problem(
            401, "unauthorized", "send 'Authorization: Bearer <PUBLISH_API_KEY>'",
            **{"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return None


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


async def read_json(
    request: web.Request, max_bytes: int, read_timeout: float
) -> Any | web.Response:
    """The request's JSON body, or the answer to a body that is slow, too
    large, cut short or not JSON."""
    try:
        async with asyncio.timeout(read_timeout):
            raw = await _read_body(request, max_bytes)
    except TimeoutError:
        return problem(408, "timeout", f"the body took longer than {read_timeout:g} s")
    except ConnectionError:  # the client went away mid-body: nobody to answer
        return problem(400, "incomplete", "the connection was lost")
    if raw is None:
        return problem(413, "too_large", f"the body is over {max_bytes} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return problem(400, "invalid_json", "the body is not valid JSON")


def idempotency_key(request: web.Request, body: dict[str, Any]) -> str | web.Response | None:
    """The ``Idempotency-Key`` header or the body's ``idempotency_key``; the
    answer to a malformed one."""
    key = request.headers.get("Idempotency-Key") or body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key)):
        return problem(
            400, "invalid_idempotency_key", "1-128 printable ASCII characters, no spaces"
        )
    return key
