"""A team's app that answers chat-api's backend hooks, in FastAPI.

    pip install -e '.[examples]'
    HOOK_SECRET=<32+ bytes> uvicorn examples.hooks_backend:app --port 9000
    HOOK_SECRET=<the same> HOOK_CONNECT_URL=http://127.0.0.1:9000/hooks/connect \\
        HOOK_PUBLISH_URL=http://127.0.0.1:9000/hooks/publish chat-api

- ``POST /login?name=alice[&rooms=lobby,team-*]`` signs a user in: it sets
  the app's own ``session`` cookie (signed with ``EXAMPLE_SESSION_SECRET``,
  a random key by default). A browser on the same site sends it with its
  WebSocket upgrade; chat-api passes it on (``HOOK_CONNECT_HEADERS``).
- ``POST /hooks/connect``: the session cookie's user, with its rooms and a
  little data for the welcome frame; without a session, a chat-api token's
  user (``AUTH_ENABLED``: the hook gets its verified claims), else 401; 403
  for a user in ``EXAMPLE_BANNED``. Users in ``EXAMPLE_TRUSTED`` are trusted (their
  messages skip the publish hook).
- ``POST /hooks/publish``: a word filter. Words of ``EXAMPLE_MASKED``
  (default ``darn,heck``) are replaced by stars; a message with a word of
  ``EXAMPLE_BLOCKED`` (default ``spam``) is rejected (``blocked_word``).

Every hook request's ``Chat-Api-Signature`` is checked against
``HOOK_SECRET`` (HMAC-SHA256 of ``"<t>.<body>"``), and a timestamp more
than ``EXAMPLE_MAX_AGE`` seconds (300) away from now is refused as a
replay: 401 either way. ``EXAMPLE_DELAY`` (seconds, default 0) delays
every hook answer, to see ``HOOK_TIMEOUT`` and ``HOOK_FAILURE_POLICY`` at
work.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from typing import Any

import orjson
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

HOOK_SECRET = os.environ.get("HOOK_SECRET", "").encode()
SESSION_SECRET = os.environ.get("EXAMPLE_SESSION_SECRET", "").encode() or secrets.token_bytes(32)
MAX_AGE = float(os.environ.get("EXAMPLE_MAX_AGE", "300"))
DELAY = float(os.environ.get("EXAMPLE_DELAY", "0"))


def _names(env: str, default: str = "") -> frozenset[str]:
    return frozenset(
        w.strip().lower() for w in os.environ.get(env, default).split(",") if w.strip()
    )


BANNED = _names("EXAMPLE_BANNED")
TRUSTED = _names("EXAMPLE_TRUSTED")
MASKED = _names("EXAMPLE_MASKED", "darn,heck")
BLOCKED = _names("EXAMPLE_BLOCKED", "spam")
WORD = re.compile(r"\w+")

app = FastAPI(title="chat-api hooks backend (example)")


# -- the app's own sign-in ---------------------------------------------------------


def _session_value(user: dict[str, Any]) -> str:
    payload = base64.urlsafe_b64encode(orjson.dumps(user)).decode()
    mac = hmac.new(SESSION_SECRET, payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{mac}"


def _session_user(cookie: str | None) -> dict[str, Any] | None:
    """The user of a ``session`` cookie value this app signed, else None."""
    if not cookie or "." not in cookie:
        return None
    payload, _, mac = cookie.rpartition(".")
    expected = hmac.new(SESSION_SECRET, payload.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, expected):
        return None
    user: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload))
    return user


def _cookie(header: str | None, name: str = "session") -> str | None:
    for part in (header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


@app.post("/login")
async def login(name: str, response: Response, rooms: str | None = None) -> dict[str, Any]:
    """Sign in (a real app checks a password) and get the session cookie."""
    if not 0 < len(name) <= 32:
        raise HTTPException(400, "name: 1 to 32 characters")
    user: dict[str, Any] = {"id": f"user-{name.lower()}", "name": name}
    if rooms is not None:
        user["rooms"] = [r for r in rooms.split(",") if r]
    response.set_cookie("session", _session_value(user), httponly=True, samesite="lax")
    return user


# -- the hooks -------------------------------------------------------------------


async def verified(request: Request) -> dict[str, Any]:
    """The JSON body of a hook request whose signature and timestamp are good."""
    body = await request.body()
    fields = dict(
        part.split("=", 1)
        for part in request.headers.get("chat-api-signature", "").split(",")
        if "=" in part
    )
    stamp = fields.get("t", "")
    if not stamp.isdigit() or not HOOK_SECRET:
        raise HTTPException(401, "the hook request is not signed")
    if abs(time.time() - int(stamp)) > MAX_AGE:
        raise HTTPException(401, "the hook request is too old (or from the future)")
    expected = hmac.new(HOOK_SECRET, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(fields.get("v1", ""), expected):
        raise HTTPException(401, "the hook request's signature does not verify")
    if DELAY:
        await asyncio.sleep(DELAY)  # EXAMPLE_DELAY: a slow app, on purpose
    payload: dict[str, Any] = orjson.loads(body)
    return payload


@app.post("/hooks/connect")
async def connect_hook(request: Request) -> JSONResponse:
    """Who a WebSocket upgrade is: the session cookie's user, or a refusal."""
    facts = await verified(request)
    user = _session_user(_cookie(facts["headers"].get("cookie")))
    claims = facts["claims"]  # with AUTH_ENABLED: the verified token's
    if user is None and claims is not None:
        # No session of ours, but a good token: its user and rooms stand.
        return JSONResponse({"data": {"signed_in_by": "token", "room": facts["room"]}})
    if user is None:
        return JSONResponse(
            {"reason": "sign in first: POST /login"},
            status_code=401,
            headers={"WWW-Authenticate": 'Session realm="chat"'},  # RFC 9110: a 401 names one
        )
    if user["name"].lower() in BANNED:
        return JSONResponse({"reason": f"{user['name']} is banned"}, status_code=403)
    answer: dict[str, Any] = {
        "user": {"id": user["id"], "name": user["name"]},
        "data": {"signed_in_by": "hooks_backend", "room": facts["room"]},
    }
    if "rooms" in user:
        answer["rooms"] = user["rooms"]
    if user["name"].lower() in TRUSTED:
        answer["trusted"] = True
    return JSONResponse(answer)


def _filtered(text: str) -> tuple[str, str | None]:
    """``text`` with masked words starred, and the first blocked word in it."""
    blocked = next((w for w in WORD.findall(text) if w.lower() in BLOCKED), None)
    masked = WORD.sub(lambda m: "*" * len(m[0]) if m[0].lower() in MASKED else m[0], text)
    return masked, blocked


@app.post("/hooks/publish")
async def publish_hook(request: Request) -> dict[str, Any]:
    """A word filter over ``data`` (a string, or an object's ``text``)."""
    message = await verified(request)
    data = message["data"]
    text = data if isinstance(data, str) else data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str):
        return {"result": "accept"}
    masked, blocked = _filtered(text)
    if blocked is not None:
        return {
            "result": "reject",
            "code": "blocked_word",
            "message": f"messages may not say {blocked!r}",
        }
    if masked == text:
        return {"result": "accept"}
    return {
        "result": "accept",
        "data": masked if isinstance(data, str) else {**data, "text": masked},
    }
