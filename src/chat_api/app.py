"""The app factory: config -> node -> transport + the service's routes.

``create_app`` is the one place the service is put together: the ``Node``
(realtime's wiring root: hub, backend, timeline, presence) from the config,
the aiohttp transport that serves its WebSockets, the backend hooks to the
team's app (``hooks``), and the service's own HTTP routes (health, stats,
presence, the publish API, the page).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from realtime import AiohttpTransport, BroadcastError, Limits, Node, NodeSettings, RedisOptions

from . import logfilter
from .api.routes import metrics_handler, register_routes
from .auth import Authenticator, make_identify, make_reauthorize, stats_guard
from .config import Config, ConfigError, redact_url
from .hooks import Hooks
from .metrics import make_registry
from .origin import OriginPolicy

__all__ = [
    "CONFIG",
    "METRICS",
    "NODE",
    "ORIGINS",
    "TRANSPORT",
    "create_app",
    "make_node",
    "node_settings",
    "serve",
]

log = logging.getLogger("chat_api")

SERVICE_NAME = "chat-api"

CONFIG = web.AppKey("config", Config)
NODE = web.AppKey("node", Node)
TRANSPORT = web.AppKey("transport", AiohttpTransport)
ORIGINS = web.AppKey("origins", OriginPolicy)
METRICS = web.AppKey("metrics", CollectorRegistry)


def node_settings(config: Config) -> NodeSettings:
    """The realtime settings of a pod configured by ``config``."""
    return NodeSettings(
        pod_id=config.pod_id,
        name=SERVICE_NAME,
        backend_url=config.redis_url,
        history_length=config.history_length,
        history_ttl=config.history_ttl,
        history_max_bytes=config.history_max_bytes,
        memory_bytes=config.history_memory_bytes,
        idempotency_keys=config.idempotency_keys,
        gap_wait=config.gap_wait,
        presence_ttl=config.presence_ttl,
        limits=Limits(
            max_message_bytes=config.max_message_bytes,
            max_buffered_bytes=config.send_buffer_bytes,
            max_rooms=config.max_rooms_per_connection,
            max_connections=config.max_connections,
            rate_per_second=config.rate_limit_per_second,
            rate_burst=config.rate_limit_burst,
            rate_max_refused=config.rate_limit_max_refused,
        ),
        redis=RedisOptions(
            channel_prefix=config.redis_channel_prefix,
            heartbeat_interval=config.redis_heartbeat_interval,
            heartbeat_timeout=config.redis_heartbeat_timeout,
            reconnect_max_delay=config.redis_reconnect_max_delay,
            publish_queue=config.redis_publish_queue,
            wait_replicas=(
                None if config.redis_wait_replicas == "auto" else int(config.redis_wait_replicas)
            ),
            wait_timeout=config.redis_wait_timeout,
            flush_delay=config.redis_flush_delay,
        ),
    )


def make_node(
    config: Config,
    auth: Authenticator | None = None,
    origins: OriginPolicy | None = None,
    hooks: Hooks | None = None,
) -> Node:
    """The pod's ``Node``, with the service's identify hook (origin check,
    then the token or a guest name, then the connect hook) and the publish
    hook as its screen; ``ConfigError`` for a bad ``REDIS_URL``."""
    if origins is None:
        origins = OriginPolicy(
            config.allowed_origins, public_url=config.public_url, host=config.host, port=config.port
        )
    if not config.local_only:
        log.info(
            "cross-pod fan-out through %s (channels %s:*)",
            redact_url(config.redis_url),
            config.redis_channel_prefix,
            extra={
                "redis": redact_url(config.redis_url),
                "channel_prefix": config.redis_channel_prefix,
            },
        )
    try:
        return Node(
            node_settings(config),
            identify=make_identify(origins, auth, None if hooks is None else hooks.connect),
            screen=None if hooks is None else hooks.screen,
            reauthorize=None
            if auth is None
            else make_reauthorize(auth, hooked=hooks is not None and hooks.connect is not None),
        )
    except (BroadcastError, ValueError) as exc:
        raise ConfigError("REDIS_URL", str(exc)) from None


def create_app(config: Config) -> web.Application:
    """Build the node and its transport for ``config`` and mount the routes."""
    auth = Authenticator(config) if config.auth_enabled else None
    origins = OriginPolicy(
        config.allowed_origins, public_url=config.public_url, host=config.host, port=config.port
    )
    hooks = Hooks.from_config(config)
    node = make_node(config, auth, origins, hooks)
    transport = AiohttpTransport(
        node,
        ping_interval=config.ws_ping_interval,
        close_timeout=config.ws_close_timeout,
        upgrade_timeout=config.http_request_timeout,
    )
    app = web.Application(client_max_size=64 * 1024)
    app[CONFIG] = config
    app[NODE] = node
    app[TRANSPORT] = transport
    app[ORIGINS] = origins
    app[METRICS] = registry = make_registry(node, hooks)
    register_routes(
        app,
        node=node,
        transport=transport,
        publish_api_key=config.publish_api_key,
        max_message_bytes=config.max_message_bytes,
        read_timeout=config.http_request_timeout,
        stats_guard=stats_guard(config, auth),
        metrics=None if config.metrics_port else registry,
    )
    app.cleanup_ctx.append(_run_node)
    if auth is not None:
        app.cleanup_ctx.append(_run_authenticator(auth))
    if hooks is not None:
        app.cleanup_ctx.append(_run_hooks(hooks, config))
    app.on_shutdown.append(_close_connections)
    return app


async def _run_node(app: web.Application) -> AsyncIterator[None]:
    # Not ``async with node.running()``: after a shutdown that timed out, the
    # loop closes this generator and that one at once, and closing this one
    # would then fail ("generator didn't stop after athrow()").
    node = app[NODE]
    await node.start()
    try:
        yield
    finally:
        await node.stop()


def _run_authenticator(
    auth: Authenticator,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        await auth.start()
        log.info(
            "authentication on: tokens verified with %s, algorithms %s",
            auth.source,
            ",".join(auth.algorithms),
        )
        yield
        await auth.close()

    return run


def _run_hooks(hooks: Hooks, config: Config) -> Callable[[web.Application], AsyncIterator[None]]:
    async def run(app: web.Application) -> AsyncIterator[None]:
        await hooks.start()
        log.info(
            "backend hooks: connect %s, publish %s; on failure %s (HOOK_FAILURE_POLICY)",
            redact_url(config.hook_connect_url) if config.hook_connect_url else "off",
            redact_url(config.hook_publish_url) if config.hook_publish_url else "off",
            config.hook_failure_policy,
        )
        yield
        await hooks.close()

    return run


async def _close_connections(app: web.Application) -> None:
    count = await app[TRANSPORT].close_all()
    if count:
        log.info("closed %d connection(s) with 1001 going away", count)


async def serve(config: Config) -> None:
    """Run one pod until SIGTERM or SIGINT, then shut down gracefully.

    Shutdown: readiness turns false and new WebSockets are refused; after
    ``SHUTDOWN_DRAIN_DELAY`` the listener closes, every connection gets 1001,
    the broadcaster stops; all within ``SHUTDOWN_TIMEOUT``.
    """
    app = create_app(config)
    logfilter.install()
    runner = _Runner(
        app,
        max_pending=config.max_pending_connections,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.ws_close_timeout,
        # Bounds a connection that sends no request, or drips its headers,
        # and an idle keep-alive one (WebSockets are not kept alive: exempt).
        keepalive_timeout=config.http_request_timeout,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Before anything is announced, so an early signal is never fatal.
        loop.add_signal_handler(sig, stop.set)
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    deadline = loop.time() + config.shutdown_timeout
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        app[ORIGINS].serving_at(port)
        if config.metrics_port:
            metrics_runner = await _serve_metrics(app[METRICS], config)
        mode = "local-only (REDIS_URL is not set)" if config.local_only else "cluster (Redis)"
        # Everything built so far (modules, app, config) lives as long as the
        # process: out of the collector's sight, a full collection walks only
        # what serving created (about half as long a pause, measured).
        gc.collect()
        gc.freeze()
        log.info(
            "chat-api listening on http://%s:%d pod=%s mode=%s",
            host,
            port,
            config.pod_id,
            mode,
            extra={
                "host": host,
                "port": port,
                "mode": "local-only" if config.local_only else "redis",
            },
        )
        await stop.wait()
        deadline = loop.time() + config.shutdown_timeout
        log.info("shutting down: readiness false, refusing new connections")
        app[NODE].drain()
        if config.shutdown_drain_delay:
            # Keep answering /readyz (503) so load balancers notice; a second
            # signal cuts the delay short.
            stop.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.shutdown_drain_delay)
    finally:
        try:
            await asyncio.wait_for(runner.cleanup(), timeout=max(0.1, deadline - loop.time()))
        except TimeoutError:
            log.warning("shutdown took longer than %.1fs; exiting anyway", config.shutdown_timeout)
        if metrics_runner is not None:  # scraped until the end
            await metrics_runner.cleanup()
    log.info("stopped")


async def _serve_metrics(registry: CollectorRegistry, config: Config) -> web.AppRunner:
    """``/metrics`` alone on ``METRICS_PORT`` of ``HOST``, without auth (keep
    that port to the scraper's network)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.metrics_port).start()
    except OSError:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    log.info("metrics on http://%s:%d/metrics (no auth)", host, port, extra={"metrics_port": port})
    return runner


class _Runner(web.AppRunner):
    """aiohttp's runner, with a cap on the TCP connections that are not (yet)
    WebSockets: past ``max_pending``, new ones are cut at once."""

    def __init__(self, app: web.Application, *, max_pending: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_pending = max_pending

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not self._max_pending:
            return server
        return cast(web.Server, _PendingCap(server, self.app[NODE], self._max_pending))


class _PendingCap:
    """A protocol factory in front of aiohttp's server that refuses a new TCP
    connection while ``cap`` are open that are not WebSockets. (The count is
    read again every 50 ms, and estimated in between, so an accept costs no
    walk over every connection.)"""

    def __init__(self, server: web.Server, node: Node, cap: int) -> None:
        self._server = server
        self._node = node
        self._cap = cap
        self._pending = 0
        self._counted_at = 0.0
        self.refused = 0

    def __call__(self) -> asyncio.BaseProtocol:
        now = time.monotonic()
        if now - self._counted_at > 0.05:
            self._counted_at = now
            self._pending = len(self._server.connections) - self._node.hub.connection_count
        if self._pending >= self._cap:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "%d pending connections: refusing new ones (%d so far)",
                    self._pending,
                    self.refused,
                )
            return _Refuse()
        self._pending += 1
        return self._server()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _Refuse(asyncio.Protocol):
    """Closes a connection as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()
