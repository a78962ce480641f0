"""Settings of the service, read once from the environment (and ``.env``).

Each setting is a field of the frozen ``Config`` dataclass whose metadata
names its environment variable and says what it does; ``.env.example`` and
the README's table list the same names (a test keeps them in step). A bad
value stops start-up with a ``ConfigError`` naming the variable.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from dotenv import dotenv_values

from realtime.backends import REDIS_SCHEMES

from .origin import parse_origin

__all__ = ["Config", "ConfigError", "redact_url"]


class ConfigError(ValueError):
    """A setting has a value the service cannot run with."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


def _setting(
    env: str, default: Any, help: str, *, minimum: float | None = None, secret: bool = False
) -> Any:
    return field(
        default=default,
        repr=not secret,
        metadata={"env": env, "help": help, "min": minimum, "secret": secret},
    )


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMATS = ("text", "json")
_PASSWORD_PARAMS = ("password", "sentinel_password")
"""Query parameters of REDIS_URL that carry a password."""


@dataclass(frozen=True)
class Config:
    """Every setting of a chat-api pod. Build it with ``Config.load()``."""

    host: str = _setting("HOST", "127.0.0.1", "Address to listen on.")
    port: int = _setting("PORT", 8000, "TCP port to listen on (0 picks a free one).", minimum=0)
    pod_id: str = _setting(
        "POD_ID",
        "",
        "Name of this pod in logs, stats and Redis envelopes (empty: hostname-random).",
    )
    log_level: str = _setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR.")
    log_format: str = _setting(
        "LOG_FORMAT",
        "text",
        "text (one line per event for people) or json (one JSON object per line, with the "
        "pod id and the event's fields).",
    )
    metrics_port: int = _setting(
        "METRICS_PORT",
        0,
        "Serve /metrics on this port of HOST instead, without auth (0: on PORT, protected "
        "like the stats endpoint).",
        minimum=0,
    )
    redis_url: str = _setting(
        "REDIS_URL",
        "",
        "Redis for cross-pod fan-out (empty: local-only): one server, redis://[user:password@]"
        "host:port[/db], rediss:// or unix:///path; a Sentinel set, redis+sentinel://"
        "[user:password@]host:port[,host:port...]/<master-name>[/db] (rediss+sentinel:// "
        "with TLS; ?sentinel_password= if the sentinels need one); a Cluster, "
        "redis+cluster://[user:password@]host:port[,host:port...] (seed nodes; "
        "rediss+cluster:// with TLS).",
        secret=True,
    )
    redis_channel_prefix: str = _setting(
        "REDIS_CHANNEL_PREFIX",
        "realtime",
        "Prefix of the Redis channels, so several deployments can share one Redis.",
    )
    redis_heartbeat_interval: float = _setting(
        "REDIS_HEARTBEAT_INTERVAL",
        1.0,
        "Seconds between the heartbeats a pod sends itself through Redis to prove its "
        "subscription works.",
        minimum=0.01,
    )
    redis_heartbeat_timeout: float = _setting(
        "REDIS_HEARTBEAT_TIMEOUT",
        5.0,
        "Seconds without its own heartbeat (or a Redis answer) before a pod rebuilds its "
        "Redis connection.",
        minimum=0.05,
    )
    redis_reconnect_max_delay: float = _setting(
        "REDIS_RECONNECT_MAX_DELAY",
        10.0,
        "Longest wait between Redis reconnect attempts (exponential backoff with jitter).",
        minimum=0.01,
    )
    redis_publish_queue: int = _setting(
        "REDIS_PUBLISH_QUEUE",
        10000,
        "Messages waiting to be published to Redis before more are counted as failed.",
        minimum=1,
    )
    redis_wait_replicas: str = _setting(
        "REDIS_WAIT_REPLICAS",
        "auto",
        "Replicas that must have a room message before its ack (Redis WAIT), so an acked "
        "message survives a failover: a number, or auto (1 with Sentinel or Cluster, 0 with "
        "one server). A message no replica confirms in time is acked without offset.",
    )
    redis_wait_timeout: float = _setting(
        "REDIS_WAIT_TIMEOUT",
        1.0,
        "Seconds an append waits for REDIS_WAIT_REPLICAS replicas (below REDIS_HEARTBEAT_TIMEOUT).",
        minimum=0.001,
    )
    redis_flush_delay: float = _setting(
        "REDIS_FLUSH_DELAY",
        0.005,
        "Seconds a pod waits, when its last write to Redis was less than this long ago, "
        "before it sends what came: messages that arrive meanwhile share one script call "
        "and one round trip (less CPU in the pod and in Redis under dense traffic, up to "
        "this much more latency; sparse traffic never waits; 0: send at once).",
        minimum=0,
    )
    auth_enabled: bool = _setting(
        "AUTH_ENABLED", False, "Require a JWT on every WebSocket connection."
    )
    auth_jwt_secret: str = _setting(
        "AUTH_JWT_SECRET",
        "",
        "Shared secret that signs HS256 tokens (at least 32 bytes; 48 for HS384, 64 for HS512).",
        secret=True,
    )
    auth_jwt_public_key: str = _setting(
        "AUTH_JWT_PUBLIC_KEY",
        "",
        "PEM public key, or the path of a PEM file, that verifies RS256/ES256 tokens.",
    )
    auth_jwks_url: str = _setting(
        "AUTH_JWKS_URL",
        "",
        "URL of a JWKS whose keys verify RS256/ES256 tokens (fetched and cached).",
    )
    auth_jwt_algorithms: tuple[str, ...] = _setting(
        "AUTH_JWT_ALGORITHMS",
        (),
        "Accepted token algorithms, comma-separated (empty: HS256 with a secret, "
        "else RS256,ES256).",
    )
    auth_audience: str = _setting(
        "AUTH_AUDIENCE", "", "Required aud claim of tokens (empty: not checked)."
    )
    auth_issuer: str = _setting(
        "AUTH_ISSUER", "", "Required iss claim of tokens (empty: not checked)."
    )
    auth_leeway_seconds: float = _setting(
        "AUTH_LEEWAY_SECONDS",
        30.0,
        "Clock skew allowed when checking exp and nbf.",
        minimum=0,
    )
    auth_name_claim: str = _setting(
        "AUTH_NAME_CLAIM", "name", "Token claim shown as the sender's name (falls back to sub)."
    )
    auth_rooms_claim: str = _setting(
        "AUTH_ROOMS_CLAIM",
        "rooms",
        "Token claim listing the rooms it may join: names or * patterns (absent: every room).",
    )
    auth_admin_claim: str = _setting(
        "AUTH_ADMIN_CLAIM",
        "admin",
        "Token claim that, when true, lets the token read the stats endpoint.",
    )
    auth_trusted_claim: str = _setting(
        "AUTH_TRUSTED_CLAIM",
        "",
        "Token claim that, when true, lets the token's messages skip the publish hook "
        "(empty: no token skips it).",
    )
    auth_jwks_cache_seconds: float = _setting(
        "AUTH_JWKS_CACHE_SECONDS",
        300.0,
        "Seconds a fetched JWKS is used before it is fetched again.",
        minimum=1,
    )
    stats_token: str = _setting(
        "STATS_TOKEN",
        "",
        "Bearer token that may read the stats endpoint (empty: stats are public "
        "unless AUTH_ENABLED).",
        secret=True,
    )
    allowed_origins: tuple[str, ...] = _setting(
        "ALLOWED_ORIGINS",
        (),
        "Browser origins that may open WebSockets, comma-separated, or * for any "
        "(empty: this service's own origins only: PUBLIC_URL, and localhost or HOST on PORT).",
    )
    public_url: str = _setting(
        "PUBLIC_URL",
        "",
        "The address users reach the service by (https://chat.example.com, behind a proxy): "
        "pages of its origin may open WebSockets.",
    )
    max_message_bytes: int = _setting(
        "MAX_MESSAGE_BYTES",
        65536,
        "Largest client frame accepted; a larger one closes the connection with 1009.",
        minimum=256,
    )
    send_buffer_bytes: int = _setting(
        "SEND_BUFFER_BYTES",
        1048576,
        "Bytes a client may fall behind before it is disconnected with 1013.",
        minimum=1024,
    )
    max_rooms_per_connection: int = _setting(
        "MAX_ROOMS_PER_CONNECTION", 10, "Rooms one connection may be in at once.", minimum=1
    )
    max_connections: int = _setting(
        "MAX_CONNECTIONS",
        10000,
        "Open WebSocket connections per pod; more are refused with HTTP 503 (0: no cap).",
        minimum=0,
    )
    max_pending_connections: int = _setting(
        "MAX_PENDING_CONNECTIONS",
        1000,
        "TCP connections per pod that are not WebSockets (requests under way, idle keep-alive); "
        "more are cut at once (0: no cap).",
        minimum=0,
    )
    http_request_timeout: float = _setting(
        "HTTP_REQUEST_TIMEOUT",
        10.0,
        "Seconds a client has to send a whole HTTP request (headers, a body) and to finish the "
        "WebSocket upgrade; idle keep-alive connections are closed after it too.",
        minimum=0.5,
    )
    rate_limit_per_second: float = _setting(
        "RATE_LIMIT_PER_SECOND",
        50.0,
        "Frames per second one connection may send; more get a rate_limited error (0: off).",
        minimum=0,
    )
    rate_limit_burst: int = _setting(
        "RATE_LIMIT_BURST",
        100,
        "Frames one connection may send at once before the per-second rate applies.",
        minimum=1,
    )
    rate_limit_max_refused: int = _setting(
        "RATE_LIMIT_MAX_REFUSED",
        100,
        "Frames over the rate limit (net of the rate) before a flood is closed with 1008.",
        minimum=0,
    )
    ws_ping_interval: float = _setting(
        "WS_PING_INTERVAL",
        20.0,
        "Keepalive: a client silent for half to all of this many seconds is pinged, and "
        "closed (1001) if it does not answer within half of it (0: off).",
        minimum=0,
    )
    ws_close_timeout: float = _setting(
        "WS_CLOSE_TIMEOUT",
        5.0,
        "Seconds a closing client gets to let go before the TCP connection is cut.",
        minimum=0.1,
    )
    history_length: int = _setting(
        "HISTORY_LENGTH",
        100,
        "Messages kept per room for history on join and for resume.",
        minimum=1,
    )
    history_max_bytes: int = _setting(
        "HISTORY_MAX_BYTES",
        1048576,
        "Bytes of messages a room keeps in its history (with HISTORY_LENGTH: the oldest go "
        "when either is reached).",
        minimum=1024,
    )
    history_memory_bytes: int = _setting(
        "HISTORY_MEMORY_BYTES",
        67108864,
        "Bytes of recent messages a pod keeps in memory for catch-up (local-only: the history), "
        "all rooms together; past it, the least recently used rooms' are dropped.",
        minimum=65536,
    )
    idempotency_keys: int = _setting(
        "IDEMPOTENCY_KEYS",
        1000,
        "Message keys (the message frame's key, the publish API's Idempotency-Key) a room "
        "remembers within HISTORY_TTL; past it, the oldest are forgotten.",
        minimum=1,
    )
    history_ttl: float = _setting(
        "HISTORY_TTL",
        3600.0,
        "Seconds a room's history and offsets are kept after its last message "
        "(with Redis the expiry is refreshed every eighth of it, so keys may go "
        "up to 1/8 sooner).",
        minimum=1,
    )
    gap_wait: float = _setting(
        "GAP_WAIT",
        0.25,
        "Seconds a pod holds a room's delivery for a missing offset before reading it from "
        "history.",
        minimum=0.01,
    )
    presence_ttl: float = _setting(
        "PRESENCE_TTL",
        15.0,
        "Seconds after which the presence entries of a pod that stopped (or was killed) vanish; "
        "pods refresh theirs every third of it.",
        minimum=0.3,
    )
    publish_api_key: str = _setting(
        "PUBLISH_API_KEY",
        "",
        "Key a backend sends as 'Authorization: Bearer <key>' to POST messages into rooms "
        "(empty: that route is off).",
        secret=True,
    )
    hook_connect_url: str = _setting(
        "HOOK_CONNECT_URL",
        "",
        "Your app's connect hook: each WebSocket upgrade is POSTed there and the app answers "
        "with the user and its rooms, or refuses (empty: off).",
    )
    hook_publish_url: str = _setting(
        "HOOK_PUBLISH_URL",
        "",
        "Your app's publish hook: each client message is POSTed there before it is sent; the "
        "app accepts, replaces its data or rejects it (empty: off).",
    )
    hook_secret: str = _setting(
        "HOOK_SECRET",
        "",
        "Shared secret that signs every hook request (Chat-Api-Signature, HMAC-SHA256; at "
        "least 32 bytes; required with a hook URL).",
        secret=True,
    )
    hook_timeout: float = _setting(
        "HOOK_TIMEOUT",
        2.0,
        "Seconds a hook request may take before it counts as failed.",
        minimum=0.01,
    )
    hook_failure_policy: str = _setting(
        "HOOK_FAILURE_POLICY",
        "refuse",
        "What a failed hook (down, slow, 5xx, a bad answer) means: refuse (HTTP 503 for a "
        "connect, an unavailable error for a message) or allow (as if there were no hook).",
    )
    hook_connect_headers: tuple[str, ...] = _setting(
        "HOOK_CONNECT_HEADERS",
        ("Cookie", "Authorization"),
        "Request headers of the upgrade passed to the connect hook, comma-separated.",
    )
    shutdown_timeout: float = _setting(
        "SHUTDOWN_TIMEOUT",
        10.0,
        "Seconds a graceful shutdown may take before the process exits anyway.",
        minimum=0.5,
    )
    shutdown_drain_delay: float = _setting(
        "SHUTDOWN_DRAIN_DELAY",
        0.0,
        "Seconds to keep listening with /readyz at 503 after SIGTERM before closing "
        "connections (counts against SHUTDOWN_TIMEOUT).",
        minimum=0,
    )

    @classmethod
    def settings(cls) -> list[dataclasses.Field[Any]]:
        """The fields that are settings, in declaration order."""
        return [f for f in dataclasses.fields(cls) if "env" in f.metadata]

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, *, env_file: str | Path | None = ".env"
    ) -> Config:
        """Read settings from ``environ`` (default: ``os.environ``) over ``env_file``."""
        values: dict[str, str | None] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update(dotenv_values(env_file))
        values.update(os.environ if environ is None else environ)
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in cls.settings():
            raw = values.get(f.metadata["env"])
            if raw is None or raw.strip() == "":
                continue
            kwargs[f.name] = _parse(f, hints[f.name], raw.strip())
        config = cls(**kwargs)
        config.validate()
        if not config.pod_id:
            config = dataclasses.replace(config, pod_id=_default_pod_id())
        return config

    def validate(self) -> None:
        """Check values that depend on more than their own type."""
        if self.port > 65535:
            raise ConfigError("PORT", f"{self.port} is not a TCP port (0-65535)")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError("LOG_LEVEL", f"must be one of {', '.join(_LOG_LEVELS)}")
        if self.log_format.lower() not in _LOG_FORMATS:
            raise ConfigError("LOG_FORMAT", f"must be one of {', '.join(_LOG_FORMATS)}")
        if self.metrics_port > 65535:
            raise ConfigError("METRICS_PORT", f"{self.metrics_port} is not a TCP port (0-65535)")
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError("METRICS_PORT", "must differ from PORT (0: serve /metrics on PORT)")
        if self.redis_url:
            scheme = urlsplit(self.redis_url).scheme
            if scheme not in REDIS_SCHEMES:
                raise ConfigError(
                    "REDIS_URL",
                    "must start with " + ", ".join(f"{s}://" for s in REDIS_SCHEMES),
                )
        if self.redis_wait_replicas != "auto" and not self.redis_wait_replicas.isdigit():
            raise ConfigError("REDIS_WAIT_REPLICAS", "must be auto or a number (0: do not wait)")
        waits = self.redis_wait_replicas not in ("auto", "0") or "+" in self.redis_url.split(":")[0]
        if waits and self.redis_wait_timeout >= self.redis_heartbeat_timeout:
            raise ConfigError("REDIS_WAIT_TIMEOUT", "must be shorter than REDIS_HEARTBEAT_TIMEOUT")
        if self.redis_flush_delay > 1.0 or self.redis_flush_delay >= self.redis_heartbeat_timeout:
            raise ConfigError(
                "REDIS_FLUSH_DELAY", "must be at most 1 second and below REDIS_HEARTBEAT_TIMEOUT"
            )
        if self.redis_heartbeat_timeout <= self.redis_heartbeat_interval:
            raise ConfigError(
                "REDIS_HEARTBEAT_TIMEOUT", "must be longer than REDIS_HEARTBEAT_INTERVAL"
            )
        if any(c.isspace() or not c.isprintable() for c in self.pod_id):
            raise ConfigError("POD_ID", "must be printable, without white space")
        if self.shutdown_drain_delay >= self.shutdown_timeout:
            raise ConfigError("SHUTDOWN_DRAIN_DELAY", "must be shorter than SHUTDOWN_TIMEOUT")
        if not self.redis_channel_prefix or any(
            c in self.redis_channel_prefix for c in "*?[] \t\r\n"
        ):
            raise ConfigError(
                "REDIS_CHANNEL_PREFIX", "must be non-empty, without glob characters or spaces"
            )
        _validate_security(self)
        _validate_hooks(self)

    @property
    def local_only(self) -> bool:
        return not self.redis_url

    @property
    def secrets(self) -> list[str]:
        """The values of the secret settings (and the password in
        ``REDIS_URL``), for scrubbing from logs; empty ones left out."""
        values = [
            getattr(self, f.name)
            for f in self.settings()
            if f.metadata["secret"] and f.name != "redis_url"  # its password, below
        ]
        if self.redis_url:
            parts = urlsplit(self.redis_url)
            values += [parts.password or "", unquote(parts.password or "")]
            values += [
                v
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
                if k.lower() in _PASSWORD_PARAMS
            ]
        # A secret of a few characters would blank out common words: too short to scrub.
        return sorted({v for v in values if isinstance(v, str) and len(v) >= 4}, key=len)[::-1]

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]


def _parse(f: dataclasses.Field[Any], kind: Any, raw: str) -> Any:
    key = f.metadata["env"]
    value: Any
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    if kind is int or kind is float:
        try:
            value = kind(raw)
        except ValueError:
            shown = "<hidden>" if f.metadata["secret"] else repr(raw)
            raise ConfigError(key, f"expected a {kind.__name__}, got {shown}") from None
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {raw!r}")
        minimum = f.metadata["min"]
        if minimum is not None and value < minimum:
            raise ConfigError(key, f"must be at least {minimum}, got {value}")
        return value
    if kind == tuple[str, ...]:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def _validate_security(config: Config) -> None:
    """Auth and origin settings that only make sense together.

    Exactly one kind of key when auth is on, and algorithms that match it:
    never ``none``, never an HMAC algorithm next to a public key (the
    algorithm-confusion attack), never a public-key one with only a secret.
    """
    for origin in config.allowed_origins:
        if origin != "*" and not _is_origin(origin):
            raise ConfigError(
                "ALLOWED_ORIGINS", f"{origin!r} is not * or an origin like https://chat.example.com"
            )
    if config.public_url and parse_origin(config.public_url, path=True) is None:
        raise ConfigError("PUBLIC_URL", "must be an http:// or https:// URL with a host name")
    if config.auth_jwks_url and urlsplit(config.auth_jwks_url).scheme not in ("http", "https"):
        raise ConfigError("AUTH_JWKS_URL", "must be an http:// or https:// URL")
    for name in config.auth_jwt_algorithms:
        if name not in _HMAC_ALGORITHMS | _KEY_ALGORITHMS:
            known = ", ".join(sorted(_HMAC_ALGORITHMS | _KEY_ALGORITHMS))
            raise ConfigError("AUTH_JWT_ALGORITHMS", f"{name!r} is not one of {known}")
    if not config.auth_enabled:
        return
    keys = [
        env
        for env, value in (
            ("AUTH_JWT_SECRET", config.auth_jwt_secret),
            ("AUTH_JWT_PUBLIC_KEY", config.auth_jwt_public_key),
            ("AUTH_JWKS_URL", config.auth_jwks_url),
        )
        if value
    ]
    if not keys:
        raise ConfigError(
            "AUTH_JWT_SECRET",
            "AUTH_ENABLED=true needs AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY or AUTH_JWKS_URL",
        )
    if len(keys) > 1:
        raise ConfigError(keys[1], f"set only one of {', '.join(keys)}")
    hmac = keys[0] == "AUTH_JWT_SECRET"
    # RFC 7518 3.2: an HMAC key at least as long as the hash.
    needed = max(
        [int(a[2:]) // 8 for a in config.auth_jwt_algorithms if a in _HMAC_ALGORITHMS] or [32]
    )
    if hmac and len(config.auth_jwt_secret.encode()) < needed:
        raise ConfigError("AUTH_JWT_SECRET", f"must be at least {needed} bytes long")
    wrong = [a for a in config.auth_jwt_algorithms if (a in _HMAC_ALGORITHMS) != hmac]
    if wrong:
        raise ConfigError(
            "AUTH_JWT_ALGORITHMS",
            f"{', '.join(wrong)} cannot be used with {keys[0]}"
            + (" (HS* needs AUTH_JWT_SECRET)" if not hmac else " (it needs a public key)"),
        )


_HOOK_POLICIES = ("refuse", "allow")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _validate_hooks(config: Config) -> None:
    """Hook URLs are http(s), a set one needs ``HOOK_SECRET``."""
    urls = [
        (env, url)
        for env, url in (
            ("HOOK_CONNECT_URL", config.hook_connect_url),
            ("HOOK_PUBLISH_URL", config.hook_publish_url),
        )
        if url
    ]
    for env, url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(env, "must be an http:// or https:// URL with a host")
    if urls and not config.hook_secret:
        raise ConfigError("HOOK_SECRET", f"{urls[0][0]} is set: hook requests must be signed")
    if config.hook_secret and len(config.hook_secret.encode()) < 32:
        raise ConfigError("HOOK_SECRET", "must be at least 32 bytes long")
    if config.hook_failure_policy not in _HOOK_POLICIES:
        raise ConfigError("HOOK_FAILURE_POLICY", f"must be one of {', '.join(_HOOK_POLICIES)}")
    for name in config.hook_connect_headers:
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError("HOOK_CONNECT_HEADERS", f"{name!r} is not a header name")


def _is_origin(value: str) -> bool:
    return "@" not in value and parse_origin(value) is not None


def _default_pod_id() -> str:
    return f"{socket.gethostname()}-{os.urandom(3).hex()}"


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``, for logs and stats:
    the one in the address (``user:password@host``) and a ``password=`` in
    the query (``unix://...?password=``)."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}:***@{netloc}")
    if parts.query:
        query = [
            (k, "***" if k.lower() in _PASSWORD_PARAMS else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        parts = parts._replace(query=urlencode(query, safe="*"))
    redacted = urlunsplit(parts)
    head = f"{parts.scheme}://"
    if url.startswith(head) and not redacted.startswith(head):  # unix:///path
        redacted = head + redacted[len(parts.scheme) + 1 :]
    return redacted
