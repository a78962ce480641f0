"""``GET /api/chat-api/ws/stats``: statistics of this pod."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from realtime import Handler

__all__ = ["stats_handler"]


def stats_handler(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def stats(request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(handler.stats(), option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )

    return stats
