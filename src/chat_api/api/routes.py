"""``register_routes``: everything the service serves over HTTP."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from realtime import Broadcaster, Handler, LinkState

from ..auth import StatsGuard
from .handlers.ws import stats_handler

__all__ = ["API_PREFIX", "WEB_DIR", "register_routes"]

API_PREFIX = "/api/chat-api"
WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def register_routes(
    app: web.Application,
    *,
    handler: Handler,
    broadcaster: Broadcaster,
    stats_guard: StatsGuard | None = None,
) -> None:
    """Mount the WebSocket routes under ``/api/chat-api``, health, and the page.
    ``stats_guard`` (if any) decides who may read the stats."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        state = broadcaster.state
        ready = not handler.draining
        body = {
            "ready": ready,
            "draining": handler.draining,
            "broadcaster": state.value,
            "link_up": state in (LinkState.LOCAL_ONLY, LinkState.CONNECTED),
        }
        return web.json_response(body, status=200 if ready else 503)

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    # The stats route comes before /ws/{room} so that it wins the match.
    app.router.add_get(f"{API_PREFIX}/ws/stats", stats_handler(handler, stats_guard))
    app.router.add_routes(handler.routes(f"{API_PREFIX}/ws"))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", index)
    app.router.add_static("/static/", WEB_DIR, follow_symlinks=False)
