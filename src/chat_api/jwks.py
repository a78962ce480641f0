"""The keys of a JWKS URL (``AUTH_JWKS_URL``), fetched with aiohttp so the
event loop never blocks, cached, and refetched with care: an identity
provider that is down, or a stream of made-up ``kid`` values, must not turn
into a stream of requests."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import jwt
import orjson

from .config import redact_url

__all__ = ["JwksCache", "JwksError"]

log = logging.getLogger("chat_api.auth")

JWKS_FETCH_TIMEOUT = 5.0
JWKS_MAX_BYTES = 1 << 20
JWKS_REFETCH_INTERVAL = 10.0
"""At most one refetch this often for tokens naming an unknown ``kid``, so a
stream of made-up kids cannot turn into a stream of requests to the IdP."""
JWKS_RETRY_INTERVAL = 2.0
"""After a failed fetch, no new attempt for this long (however many clients
knock meanwhile)."""


class JwksError(Exception):
    """No key for a token: none matches its ``kid``, or (``unavailable``)
    no keys could be fetched at all."""

    def __init__(self, reason: str, *, unavailable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unavailable = unavailable


class JwksCache:
    """The keys of a JWKS URL, fetched without blocking the event loop.

    Keys are fetched on first use and again after ``ttl`` seconds; a token
    with an unknown ``kid`` triggers an early refetch (at most one per
    ``JWKS_REFETCH_INTERVAL``). Concurrent callers share one fetch. When a
    fetch fails the previous keys stay in use, and the next attempt waits
    ``JWKS_RETRY_INTERVAL``.
    """

    def __init__(self, url: str, ttl: float) -> None:
        self.url = url
        self.ttl = ttl
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._last_attempt = -float("inf")
        self._last_forced = -float("inf")
        self._failed_at = -float("inf")
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key for ``kid`` (a token without ``kid``: the only key)."""
        if time.monotonic() - self._fetched_at > self.ttl:
            await self._refresh(force=False)
        found = self._find(kid)
        if found is None and time.monotonic() - self._last_forced > JWKS_REFETCH_INTERVAL:
            self._last_forced = time.monotonic()
            await self._refresh(force=True)
            found = self._find(kid)
        if found is None:
            if not self._keys:
                raise JwksError("the signing keys are unavailable right now", unavailable=True)
            raise JwksError("no known key matches the token's kid")
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    async def _refresh(self, *, force: bool) -> None:
        started = time.monotonic()
        async with self._lock:
            now = time.monotonic()
            if (
                self._last_attempt >= started  # someone fetched while we waited
                or now - self._failed_at < JWKS_RETRY_INTERVAL
                or (not force and now - self._fetched_at <= self.ttl)
            ):
                return
            self._last_attempt = now
            try:
                keys = await self._fetch()
            except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as exc:
                self._failed_at = time.monotonic()
                log.warning(
                    "fetching the JWKS from %s failed: %s", redact_url(self.url), _describe(exc)
                )
                return
            self._keys = keys
            self._fetched_at = time.monotonic()
            self._failed_at = -float("inf")
            log.info("fetched the JWKS from %s: %d key(s)", redact_url(self.url), len(keys))

    async def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        if self._session is None:
            raise ValueError("the JWKS client is not started")
        async with self._session.get(self.url) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError(f"the JWKS is larger than {JWKS_MAX_BYTES} bytes")
        document = orjson.loads(body)
        if not isinstance(document, dict):
            raise ValueError("the JWKS is not a JSON object")
        keys = jwt.PyJWKSet.from_dict(document)
        return {k.key_id: k for k in keys if k.public_key_use in (None, "sig")}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
