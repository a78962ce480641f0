"""JWT authentication of WebSocket clients, and who may read the stats.

With ``AUTH_ENABLED=true`` every WebSocket presents a JWT, in an
``Authorization: Bearer`` header or an ``access_token`` query parameter
(browsers cannot set headers on a WebSocket). It is verified with PyJWT
against exactly one kind of key: a shared secret (HS*), a PEM public key, or
the keys of a JWKS URL (fetched with aiohttp, cached, refetched when a token
names an unknown ``kid``). Only the algorithms of ``AUTH_JWT_ALGORITHMS`` are
accepted (never ``none``; never HS* next to a public key). A token that fails
is refused before the WebSocket is accepted, with HTTP 401; nothing about the
token is echoed or logged. A token whose ``AUTH_TRUSTED_CLAIM`` is ``true``
makes a trusted connection: its messages skip the publish hook.

A good token becomes an ``Admission`` for the realtime handler: identity
``sub`` + display name, the expiry (the handler closes with 1008 "token
expired" then), and the rooms of the rooms claim, if any.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from realtime import (
    Admission,
    Handshake,
    Identify,
    Identity,
    Reauthorize,
    Refused,
    guest_identity,
)
from realtime.core.access import admission, clean_name
from realtime.core.protocol import ROOM_PATTERN

from .config import Config, ConfigError, redact_url
from .jwks import JwksCache, JwksError
from .origin import OriginPolicy

__all__ = [
    "Authenticator",
    "ConnectDecider",
    "RoomPatterns",
    "StatsGuard",
    "TokenError",
    "bearer_token",
    "make_identify",
    "stats_guard",
]

log = logging.getLogger("chat_api.auth")

MAX_SUB_LENGTH = 256
MAX_ROOM_PATTERNS = 256


class TokenError(Exception):
    """A token (or the lack of one) that cannot admit a client.

    ``reason`` is safe to show the client and to log: it never contains the
    token. ``status`` is the HTTP status of the refusal; ``missing`` tells a
    request without a token from one with a bad token (RFC 6750 3.1).
    """

    def __init__(self, reason: str, status: int = 401, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.missing = missing


def bearer_token(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer ...``, else of ``?access_token=``
    (``headers`` looked up by lower-case name, as a ``Handshake``'s are)."""
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return query.get("access_token") or None


class RoomPatterns:
    """The rooms a token may join: exact names, or patterns where ``*``
    stands for any run of characters (``team-*``). Only ``*`` alone admits
    the global channel.

    Matching takes time linear in the room name per pattern, whatever the
    pattern (``a*a*a*a*b`` as a regex would backtrack): each part between
    stars is found leftmost, in order, which is exact for ``*``-only globs."""

    __slots__ = ("_exact", "_global", "_globs", "patterns")

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns
        self._global = "*" in patterns
        self._exact = frozenset(p for p in patterns if "*" not in p)
        self._globs = [tuple(p.split("*")) for p in patterns if "*" in p]

    @classmethod
    def from_claim(cls, claim: object) -> RoomPatterns:
        """Parse a rooms claim: a list of strings or one space-separated string."""
        items = claim.split() if isinstance(claim, str) else claim
        if not isinstance(items, list) or len(items) > MAX_ROOM_PATTERNS:
            raise TokenError("the token's rooms claim is not a list of room names")
        for item in items:
            if not isinstance(item, str) or (
                item != "*" and ROOM_PATTERN.fullmatch(item.replace("*", "x")) is None
            ):
                raise TokenError("the token's rooms claim is not a list of room names")
        return cls(items)

    def __call__(self, room: str | None) -> bool:
        if room is None:
            return self._global
        return room in self._exact or any(_glob_match(parts, room) for parts in self._globs)


def _glob_match(parts: tuple[str, ...], name: str) -> bool:
    """Whether ``name`` matches the glob whose ``*``-separated parts these are."""
    first, *middle, last = parts
    if len(name) < len(first) + len(last) or not name.startswith(first):
        return False
    end = len(name) - len(last)
    if not name.endswith(last):
        return False
    pos = len(first)
    for part in middle:
        found = name.find(part, pos, end)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def _default_algorithms(key: Any) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256",)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp384r1": ("ES384",), "secp521r1": ("ES512",)}.get(key.curve.name, ("ES256",))
    return ("EdDSA",)


def _fits(algorithm: str, key: Any) -> bool:
    if algorithm.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePublicKey)
    return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


def _load_public_key(value: str) -> Any:
    """A PEM public key given inline or as the path of a file."""
    pem = value
    if "-----BEGIN" not in value:
        try:
            pem = Path(value).read_text()
        except OSError as exc:
            raise ConfigError(
                "AUTH_JWT_PUBLIC_KEY", f"not a PEM key and not a readable file: {exc.strerror}"
            ) from None
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError:
        raise ConfigError("AUTH_JWT_PUBLIC_KEY", "is not a PEM public key") from None
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise ConfigError("AUTH_JWT_PUBLIC_KEY", "must be an RSA, EC or Ed25519 public key")
    return key


# Reasons shown for PyJWT's exceptions; PyJWT's own messages are not shown.
_REASONS: list[tuple[type[jwt.PyJWTError], str]] = [
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is for another audience"),
    (jwt.InvalidIssuerError, "the token has another issuer"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidKeyError, "the token's key is not accepted"),
    (jwt.DecodeError, "the token is malformed"),
]


class Authenticator:
    """Verifies JWTs as configured, and turns good ones into admissions."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._jwks: JwksCache | None = None
        self._key: Any = None
        algorithms = config.auth_jwt_algorithms
        if config.auth_jwt_secret:
            self._key = config.auth_jwt_secret
            algorithms = algorithms or ("HS256",)
        elif config.auth_jwt_public_key:
            self._key = _load_public_key(config.auth_jwt_public_key)
            algorithms = algorithms or _default_algorithms(self._key)
            unfit = [a for a in algorithms if not _fits(a, self._key)]
            if unfit:
                raise ConfigError(
                    "AUTH_JWT_ALGORITHMS", f"{', '.join(unfit)} do not fit AUTH_JWT_PUBLIC_KEY"
                )
        elif config.auth_jwks_url:
            self._jwks = JwksCache(config.auth_jwks_url, config.auth_jwks_cache_seconds)
            algorithms = algorithms or ("RS256", "ES256")
        else:
            raise ConfigError("AUTH_JWT_SECRET", "no key to verify tokens with")
        self.algorithms: tuple[str, ...] = algorithms

    @property
    def source(self) -> str:
        """Which key verifies tokens, for the start-up log (no secrets)."""
        if self._jwks is not None:
            return f"JWKS {redact_url(self._jwks.url)}"
        return "AUTH_JWT_SECRET" if self._config.auth_jwt_secret else "AUTH_JWT_PUBLIC_KEY"

    async def start(self) -> None:
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; raises ``TokenError`` otherwise."""
        config = self._config
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self.algorithms:
                raise TokenError("the token's algorithm is not accepted")
            key = self._key
            if self._jwks is not None:
                kid = header.get("kid")
                try:
                    key = await self._jwks.key(kid if isinstance(kid, str) else None)
                except JwksError as exc:
                    raise TokenError(exc.reason, 503 if exc.unavailable else 401) from None
                if key.algorithm_name != alg:
                    raise TokenError("the token's algorithm does not fit its key")
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self.algorithms),
                audience=config.auth_audience or None,
                issuer=config.auth_issuer or None,
                leeway=config.auth_leeway_seconds,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": bool(config.auth_audience),
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            # The claim's name is ours (the required list), never the token's content.
            raise TokenError(f"the token lacks the required {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            reason = next((r for kind, r in _REASONS if isinstance(exc, kind)), None)
            raise TokenError(reason or "the token is invalid") from None
        return claims

    async def admit(self, token: str | None) -> Admission:
        """The admission a token grants; raises ``TokenError``."""
        return (await self.admit_claims(token))[0]

    async def admit_claims(self, token: str | None) -> tuple[Admission, dict[str, Any]]:
        """The admission a token grants, and its verified claims; raises ``TokenError``."""
        if token is None:
            raise TokenError(
                "a token is required: Authorization: Bearer or ?access_token=", missing=True
            )
        claims = await self.verify(token)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUB_LENGTH:
            raise TokenError("the token's sub claim is not a usable user id")
        shown = claims.get(self._config.auth_name_claim)
        name = clean_name(shown if isinstance(shown, str) else None) or clean_name(sub) or "user"
        rooms = claims.get(self._config.auth_rooms_claim)
        trusted_claim = self._config.auth_trusted_claim
        granted = Admission(
            Identity(id=sub, name=name),
            expires_at=float(claims["exp"]) + self._config.auth_leeway_seconds,
            may_join=None if rooms is None else RoomPatterns.from_claim(rooms),
            trusted=bool(trusted_claim) and claims.get(trusted_claim) is True,
            subject=sub,
        )
        return granted, claims

    async def identify(self, handshake: Handshake) -> Admission:
        """The realtime ``identify`` hook: admit, or refuse with HTTP 401/503."""
        return (await self.identify_claims(handshake))[0]

    async def identify_claims(self, handshake: Handshake) -> tuple[Admission, dict[str, Any]]:
        """``identify``, with the token's verified claims (for the connect hook)."""
        try:
            return await self.admit_claims(bearer_token(handshake.headers, handshake.query))
        except TokenError as exc:
            log.debug(
                "refused a WebSocket from %s: %s",
                handshake.remote,
                exc.reason,
                extra={
                    "remote": handshake.remote,
                    "connection_id": handshake.connection_id,
                    "room": handshake.room,
                    "status": exc.status,
                    "reason": exc.reason,
                },
            )
            raise _refusal(exc) from None

    async def reauthorize(self, token: str) -> Admission:
        """The admission a ``refresh`` frame's token grants, or ``Refused``
        with the reason."""
        try:
            return await self.admit(token)
        except TokenError as exc:
            raise _refusal(exc) from None

    async def is_admin(self, token: str) -> bool:
        try:
            claims = await self.verify(token)
        except TokenError:
            return False
        return claims.get(self._config.auth_admin_claim) is True


def _refusal(exc: TokenError) -> Refused:
    if exc.status == 503:
        return Refused(503, exc.reason, headers={"Retry-After": "5"})
    challenge = "Bearer" if exc.missing else 'Bearer error="invalid_token"'
    return Refused(401, exc.reason, headers={"WWW-Authenticate": challenge})


class ConnectDecider(Protocol):
    """What decides after the token (the connect hook, ``hooks.ConnectHook``)."""

    async def admit(
        self, handshake: Handshake, *, claims: Mapping[str, Any] | None, fallback: Admission
    ) -> Admission: ...


def make_identify(
    origins: OriginPolicy, auth: Authenticator | None, connect_hook: ConnectDecider | None = None
) -> Identify:
    """The handler's ``identify`` hook: the Origin check, then the token
    (``AUTH_ENABLED``) or a guest name from ``?name=``; then, with
    ``HOOK_CONNECT_URL``, the app's connect hook, which gets the token's
    verified claims and decides (the token's or guest's admission stands
    when the hook fails under ``HOOK_FAILURE_POLICY=allow``)."""

    async def identify(handshake: Handshake) -> Identity | Admission:
        origins.check(handshake)
        claims: dict[str, Any] | None = None
        if auth is None:
            granted = admission(await guest_identity(handshake))
        else:
            granted, claims = await auth.identify_claims(handshake)
        if connect_hook is None:
            return granted
        return await connect_hook.admit(handshake, claims=claims, fallback=granted)

    return identify


def make_reauthorize(auth: Authenticator, *, hooked: bool) -> Reauthorize:
    """The node's ``reauthorize`` hook: the new token's terms; with a connect
    hook, the terms the app gave at connect, for as long as the new token
    lasts (the app chose the user, rooms and data; a token only extends them)."""

    async def reauthorize(token: str, current: Admission) -> Admission:
        fresh = await auth.reauthorize(token)
        if not hooked:
            return fresh
        return dataclasses.replace(current, expires_at=fresh.expires_at, subject=fresh.subject)

    return reauthorize


StatsGuard = Callable[[web.Request], Awaitable[None]]


def stats_guard(config: Config, auth: Authenticator | None) -> StatsGuard | None:
    """Who may read the stats endpoint, or None when it is public.

    Public unless ``STATS_TOKEN`` is set or ``AUTH_ENABLED``. Then it needs
    ``Authorization: Bearer`` with the ``STATS_TOKEN``, or (with auth on) a
    valid JWT whose ``AUTH_ADMIN_CLAIM`` is ``true``.
    """
    if not config.stats_token and auth is None:
        return None
    expected = config.stats_token.encode()

    async def guard(request: web.Request) -> None:
        token = bearer_token(request.headers, request.query)
        if token is None:
            raise web.HTTPUnauthorized(
                text="this endpoint needs a bearer token: STATS_TOKEN or an admin token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if expected and hmac.compare_digest(token.encode(), expected):
            return
        if auth is not None and await auth.is_admin(token):
            return
        raise web.HTTPForbidden(
            text="this token may not read this endpoint: it is not STATS_TOKEN "
            "and not a valid token with the admin claim"
        )

    return guard
