"""``GET /api/chat-api/ws/stats``: statistics of this pod."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from realtime import Node

__all__ = ["stats_handler"]


def stats_handler(
    node: Node, guard: Callable[[web.Request], Awaitable[None]] | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``guard`` raises an HTTP error for a request that may not see the stats."""

    async def stats(request: web.Request) -> web.Response:
        if guard is not None:
            await guard(request)
        return web.Response(
            body=orjson.dumps(node.stats(), option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )

    return stats
