"""What every Redis connection of the backend shares: where to connect, the
wire protocol's command packing, and how link failures are told apart.

``RedisAddress`` is read from a ``redis://``, ``rediss://`` or ``unix://`` URL
(with redis-py's own parser) and opens TCP, TLS or unix-socket connections
for the pod's hiredis-fed link (``link.py``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from ...core.exceptions import BroadcastError

__all__ = ["LINK_ERRORS", "InFlightLost", "RedisAddress", "describe", "pack_command"]

LINK_ERRORS = (OSError, TimeoutError, RedisError, BroadcastError)
"""What a Redis link may fail with: counted and logged, never a crash."""


class InFlightLost(ConnectionError):
    """The connection went while commands were written and not answered:
    whether they ran is unknown."""


def pack_command(*args: bytes | str | int | float) -> bytes:
    """One command in the Redis wire protocol (RESP), by hiredis (numbers
    and strings as their text)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub wants 1-tuples
    return packed


def describe(exc: BaseException) -> str:
    """``exc`` for a log line: its type and message."""
    text = str(exc)
    if not text and isinstance(exc, TimeoutError):
        text = "no answer in time"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, read from a ``redis://``, ``rediss://`` or
    ``unix://`` URL (the same parser redis-py uses). Never shown in logs."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_verify: bool = True
    tls_ca_file: str | None = None
    db: int = 0
    """Database of the keys (history, presence); pub/sub ignores it."""

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        try:
            kwargs: dict[str, Any] = dict(parse_url(url))
        except ValueError as exc:
            raise BroadcastError(f"invalid Redis URL: {exc}") from None
        cert_reqs = str(kwargs.get("ssl_cert_reqs", "required")).lower()
        return cls(
            host=str(kwargs.get("host", "localhost")),
            port=int(kwargs.get("port", 6379)),
            path=kwargs.get("path"),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=url.startswith("rediss:"),
            tls_verify=cert_reqs not in ("none", "cert_none", "0"),
            tls_ca_file=kwargs.get("ssl_ca_certs"),
            db=int(kwargs.get("db") or 0),
        )

    @property
    def label(self) -> str:
        """``host:port`` or the socket's path: for logs and stats (no secrets)."""
        return self.path if self.path is not None else f"{self.host}:{self.port}"

    async def connect(self, factory: Callable[[], asyncio.Protocol]) -> None:
        """Open a connection (TCP, TLS or unix socket) to ``factory()``."""
        loop = asyncio.get_running_loop()
        if self.path is not None:
            await loop.create_unix_connection(factory, self.path)
            return
        context = self.ssl_context()
        await loop.create_connection(
            factory,
            self.host,
            self.port,
            ssl=context,
            server_hostname=self.host if context is not None else None,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.tls_ca_file)
        if not self.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context
