"""``register_routes``: everything the service serves over HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from realtime import AiohttpTransport, BroadcastError, Node, Presence
from realtime.core.protocol import validate_room

from ..auth import StatsGuard
from ..metrics import CONTENT_TYPE, render
from .handlers.publish import publish_handler
from .handlers.users import disconnect_handler, user_message_handler
from .handlers.ws import stats_handler

__all__ = ["API_PREFIX", "WEB_DIR", "metrics_handler", "register_routes"]

API_PREFIX = "/api/chat-api"
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def register_routes(
    app: web.Application,
    *,
    node: Node,
    transport: AiohttpTransport,
    publish_api_key: str = "",
    max_message_bytes: int = 65536,
    read_timeout: float = 10.0,
    stats_guard: StatsGuard | None = None,
    metrics: CollectorRegistry | None = None,
) -> None:
    """Mount the WebSocket routes under ``/api/chat-api``, health, and the page,
    and ``/metrics`` for ``metrics`` (if given: None when they are served on
    a port of their own). ``stats_guard`` (if any) decides who may read the
    stats, the presence and the metrics."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = not node.draining
        body: dict[str, object] = {
            "ready": ready,
            "draining": node.draining,
            "broadcaster": node.backend.state.value,
            "link_up": node.link_up,
        }
        broadcaster = node.backend.stats()
        if "primaries" in broadcaster:  # Sentinel or Cluster: which nodes, since when
            body["primaries"] = broadcaster["primaries"]
            body["primary_since"] = broadcaster["primary_since"]
        return web.json_response(body, status=200 if ready else 503)

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    # The stats route comes before /ws/{room} so that it wins the match.
    app.router.add_get(f"{API_PREFIX}/ws/stats", stats_handler(node, stats_guard))
    app.router.add_routes(transport.routes(f"{API_PREFIX}/ws"))
    app.router.add_post(
        f"{API_PREFIX}/rooms/{{room}}/messages",
        publish_handler(
            node, publish_api_key, max_bytes=max_message_bytes, read_timeout=read_timeout
        ),
    )
    for path, make in (("messages", user_message_handler), ("disconnect", disconnect_handler)):
        app.router.add_post(
            f"{API_PREFIX}/users/{{user}}/{path}",
            make(node, publish_api_key, max_bytes=max_message_bytes, read_timeout=read_timeout),
        )
    app.router.add_get(
        f"{API_PREFIX}/rooms/{{room}}/presence", presence_handler(node.presence, stats_guard)
    )
    app.router.add_get("/healthz", healthz)
    if metrics is not None:
        app.router.add_get("/metrics", metrics_handler(metrics, stats_guard))
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
    app.router.add_static("/static/", WEB_DIR, follow_symlinks=False)


def metrics_handler(
    registry: CollectorRegistry, guard: StatsGuard | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /metrics``: the registry in the Prometheus text format; ``guard``
    (if any) decides who may read it, as for the stats."""

    async def handle(request: web.Request) -> web.Response:
        if guard is not None:
            await guard(request)
        return web.Response(body=render(registry), headers={"Content-Type": CONTENT_TYPE})

    return handle


def presence_handler(
    presence: Presence, guard: StatsGuard | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /api/chat-api/rooms/{room}/presence``: who is in the room, on every
    pod. ``guard`` (if any) decides who may ask, as for the stats."""

    async def handle(request: web.Request) -> web.Response:
        if guard is not None:
            await guard(request)
        room = request.match_info["room"]
        try:
            validate_room(room)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        try:
            members = await presence.members(room)
        except BroadcastError as exc:
            raise web.HTTPServiceUnavailable(text=f"presence unavailable: {exc}") from exc
        body = {"room": room, "members": [m.as_json() for m in members]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return handle
