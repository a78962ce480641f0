"""chat-api's WebSocket protocol inside a FastAPI app, on any ASGI server.

    pip install -e '.[examples]'
    uvicorn examples.fastapi_chat:app            # local-only, 127.0.0.1:8000
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_chat:app --port 8001

It serves ``/api/chat-api/ws`` and ``/api/chat-api/ws/{room}`` with exactly
the chat-api protocol (``docs/protocol.md``), so a pod of it and a
``chat-api`` pod on the same Redis share rooms, offsets and history. The
settings are chat-api's, read from the environment and ``.env`` by
``chat_api.config.Config`` (``REDIS_URL``, ``POD_ID``, ``HISTORY_LENGTH``,
the limits ...); host and port are uvicorn's (``--host``, ``--port``), and
so are WebSocket pings (``--ws-ping-interval``).

The team's own sign-in plugs in through the node's ``identify`` hook: here,
``POST /login`` with a name sets a session cookie, and a WebSocket that
brings the cookie speaks as that user. Without one it is a guest (set
``EXAMPLE_REQUIRE_LOGIN=1`` to refuse guests with HTTP 401 instead). Any
check of your app can go there: a database session, a FastAPI dependency's
logic, an API key; raise ``realtime.Refused`` to refuse before the upgrade.
chat-api's backend hooks work here too (``HOOK_CONNECT_URL``,
``HOOK_PUBLISH_URL``; ``examples/hooks_backend.py`` is an app that answers
them).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from starlette.routing import WebSocketRoute

from chat_api.app import node_settings
from chat_api.config import Config
from chat_api.hooks import Hooks
from chat_api.metrics import CONTENT_TYPE, make_registry, render
from chat_api.origin import OriginPolicy
from realtime import Admission, AsgiTransport, Handshake, Identity, Node, Refused, guest_identity
from realtime.core.access import admission

config = Config.load()
# The pod's own origins: PUBLIC_URL, and localhost (on any port: uvicorn's is not known here).
origins = OriginPolicy(config.allowed_origins, public_url=config.public_url, host=config.host)

SESSIONS: dict[str, Identity] = {}
"""Your app's sessions (a table in your database); a dict for the example."""
REQUIRE_LOGIN = os.environ.get("EXAMPLE_REQUIRE_LOGIN", "") in ("1", "true", "yes")


def session_user(handshake: Handshake) -> Identity | None:
    """The signed-in user of the request's ``session`` cookie, if any."""
    cookie = SimpleCookie()
    cookie.load(handshake.header("cookie") or "")
    morsel = cookie.get("session")
    return None if morsel is None else SESSIONS.get(morsel.value)


hooks = Hooks.from_config(config)
"""chat-api's backend hooks (HOOK_CONNECT_URL, HOOK_PUBLISH_URL), if set."""


async def identify(handshake: Handshake) -> Identity | Admission:
    """Who a new WebSocket is: the team's own sign-in, else a guest; with
    HOOK_CONNECT_URL the connect hook decides (this stands if it fails
    under HOOK_FAILURE_POLICY=allow)."""
    origins.check(handshake)  # the same Origin rule as chat-api
    user = session_user(handshake)
    if hooks is not None and hooks.connect is not None:
        own = Admission(user) if user is not None else admission(await guest_identity(handshake))
        return await hooks.connect.admit(handshake, claims=None, fallback=own)
    if user is not None:
        return user
    if REQUIRE_LOGIN:
        raise Refused(401, "sign in first: POST /login")
    return await guest_identity(handshake)


node = Node(
    node_settings(config), identify=identify, screen=None if hooks is None else hooks.screen
)
transport = AsgiTransport(node, close_timeout=config.ws_close_timeout)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if hooks is not None:
        await hooks.start()
    try:
        async with node.running():
            yield
            node.close_connections()
    finally:
        if hooks is not None:
            await hooks.close()


app = FastAPI(title="chat-api protocol on FastAPI", lifespan=lifespan)
# The transport is an ASGI app: a route whose endpoint it is gets the raw
# connection (the room from the path parameter).
app.router.routes += [
    WebSocketRoute("/api/chat-api/ws", transport),
    WebSocketRoute("/api/chat-api/ws/{room}", transport),
]


@app.post("/login")
async def login(name: str, response: Response) -> dict[str, str]:
    """Sign in (your app does this its own way) and get a session cookie."""
    token = secrets.token_urlsafe(24)
    user = Identity(id=f"user-{name}", name=name[:32])
    SESSIONS[token] = user
    response.set_cookie("session", token, httponly=True, samesite="strict")
    return user.as_json()


@app.get("/api/chat-api/ws/stats")
async def stats() -> dict[str, Any]:
    return node.stats()


metrics = make_registry(node, hooks)


@app.get("/metrics")
async def prometheus_metrics() -> Response:
    """The same metrics as a chat-api pod's (public here: protect it as your app does)."""
    return Response(render(metrics), media_type=CONTENT_TYPE)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz")
async def readyz() -> JSONResponse:
    body = {
        "ready": not node.draining,
        "draining": node.draining,
        "broadcaster": node.backend.state.value,
        "link_up": node.link_up,
    }
    return JSONResponse(body, status_code=503 if node.draining else 200)
