"""Keys, tokens, a JWKS server and refused handshakes for the security tests.

The JWKS server is a real aiohttp server on 127.0.0.1 (port 0) in the test
process; pods fetch keys from it over HTTP like they would from an IdP.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .support import DEFAULT_TIMEOUT

SECRET = "test-secret-" + secrets.token_hex(32)  # >= 64 bytes (HS512), unique per run


@dataclass(frozen=True)
class KeyPair:
    private: Any
    kid: str
    alg: str

    @property
    def public_pem(self) -> str:
        return str(
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        data: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}


def rsa_key(kid: str = "rsa-1") -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid, "RS256")


def ec_key(kid: str = "ec-1") -> KeyPair:
    return KeyPair(ec.generate_private_key(ec.SECP256R1()), kid, "ES256")


def claims(sub: str = "user-1", *, ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + ttl, **extra}


def hs_token(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def key_token(payload: dict[str, Any], key: KeyPair, *, kid: bool = True) -> str:
    headers = {"kid": key.kid} if kid else None
    return jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)


def forge_hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token made by hand with any bytes as the HMAC key (PyJWT
    refuses a PEM key for HMAC, which is the point of the attack)."""

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps(payload).encode())
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


@dataclass
class JwksServer:
    """Serves ``keys`` at ``url``; counts (and times) requests; can answer 500."""

    keys: list[KeyPair]
    url: str = ""
    requests: int = 0
    request_times: list[float] = field(default_factory=list)
    """``time.monotonic()`` of each request."""
    failing: bool = False
    runner: web.AppRunner | None = field(default=None, repr=False)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.request_times.append(time.monotonic())
        if self.failing:
            return web.Response(status=500, text="down")
        return web.json_response({"keys": [k.jwk() for k in self.keys]})


@asynccontextmanager
async def jwks_server(keys: list[KeyPair]) -> AsyncIterator[JwksServer]:
    server = JwksServer(keys)
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server._jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/.well-known/jwks.json"
    try:
        yield server
    finally:
        await runner.cleanup()


async def handshake(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    """A WebSocket upgrade request that we expect to be refused: its status,
    body and headers, as any client (a browser, a proxy) would see them."""
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **(headers or {}),
    }
    async with (
        asyncio.timeout(DEFAULT_TIMEOUT),
        session.get(url.replace("ws://", "http://"), headers=upgrade) as resp,
    ):
        return resp.status, await resp.text(), dict(resp.headers)
