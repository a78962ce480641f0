"""Backends: what links the pods of one deployment (see ``base`` for the contract).

``open_backend`` picks one by URL and imports it only then: an empty URL is
the local-only ``MemoryBackend``; ``redis://``, ``rediss://`` and
``unix://`` are the ``RedisBackend`` (which needs ``redis`` and ``hiredis``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.exceptions import BroadcastError
from .base import (
    PRESENCE_BURST,
    Backend,
    BackendHandler,
    LinkState,
    Member,
    OnAppended,
    PresenceStore,
    Slice,
    Stamp,
    Unstored,
    content_digest,
    data_digest,
    key_field,
    new_epoch,
)
from .memory import MemoryBackend, MemoryPresence

__all__ = [
    "PRESENCE_BURST",
    "REDIS_SCHEMES",
    "Backend",
    "BackendHandler",
    "LinkState",
    "Member",
    "MemoryBackend",
    "MemoryPresence",
    "OnAppended",
    "PresenceStore",
    "RedisOptions",
    "Slice",
    "Stamp",
    "Unstored",
    "content_digest",
    "data_digest",
    "key_field",
    "new_epoch",
    "open_backend",
]

REDIS_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
"""URL schemes ``open_backend`` takes: standalone Redis (TCP, TLS, a socket), Sentinel
and Cluster, each with TLS."""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """How the Redis backend talks to Redis (ignored by the others)."""

    channel_prefix: str = "realtime"
    """First part of every channel and key, so deployments can share a Redis."""
    heartbeat_interval: float = 1.0
    """Seconds between the heartbeats a pod sends itself through Redis."""
    heartbeat_timeout: float = 5.0
    """Seconds without a heartbeat (or an answer) before the link is rebuilt."""
    reconnect_max_delay: float = 10.0
    """Longest wait between reconnect attempts (exponential, with jitter)."""
    publish_queue: int = 10_000
    """Messages waiting to be published before more are counted as failed."""
    wait_replicas: int | None = None
    """Replicas that must have a room message before it is acknowledged
    (``WAIT``); None: 1 with Sentinel or Cluster, 0 with one server."""
    wait_timeout: float = 1.0
    """Seconds an append waits for them (below ``heartbeat_timeout``)."""
    flush_delay: float = 0.005
    """Seconds an idle publisher waits before it writes, so that what comes
    meanwhile goes in the same batch (0: write at once)."""


def open_backend(
    url: str,
    *,
    pod_id: str,
    name: str = "realtime",
    history_length: int = 100,
    history_ttl: float = 3600.0,
    history_max_bytes: int = 1 << 20,
    memory_bytes: int = 64 << 20,
    idempotency_keys: int = 1000,
    redis: RedisOptions | None = None,
) -> Backend:
    """The backend for ``url`` (empty: local-only). Raises ``BroadcastError``
    for a URL no backend takes (its scheme, or a value that does not parse);
    nothing is connected until the backend is started."""
    if not url:
        return MemoryBackend(
            history_length=history_length,
            history_ttl=history_ttl,
            history_max_bytes=history_max_bytes,
            memory_bytes=memory_bytes,
            idempotency_keys=idempotency_keys,
        )
    scheme = url.partition("://")[0].lower()
    if scheme not in REDIS_SCHEMES:
        known = ", ".join(f"{s}://" for s in REDIS_SCHEMES)
        raise BroadcastError(f"no backend for {scheme or url!r}: the URL must start with {known}")
    from .redis.backend import RedisBackend  # only now: it needs redis and hiredis

    options = redis or RedisOptions()
    return RedisBackend(
        url,
        pod_id=pod_id,
        name=name,
        channel_prefix=options.channel_prefix,
        heartbeat_interval=options.heartbeat_interval,
        heartbeat_timeout=options.heartbeat_timeout,
        reconnect_max_delay=options.reconnect_max_delay,
        publish_queue=options.publish_queue,
        wait_replicas=options.wait_replicas,
        wait_timeout=options.wait_timeout,
        flush_delay=options.flush_delay,
        history_length=history_length,
        history_ttl=history_ttl,
        history_max_bytes=history_max_bytes,
        idempotency_keys=idempotency_keys,
    )
