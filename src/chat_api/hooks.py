"""Backend hooks: the team's app decides who connects and what is sent.

Two optional HTTP hooks, each a signed ``POST`` of JSON to the app
(``docs/protocol.md``, *Backend hooks*):

- the **connect hook** (``HOOK_CONNECT_URL``) sees each WebSocket upgrade
  (the headers named in ``HOOK_CONNECT_HEADERS``, the room, the query, the
  client's address and, with ``AUTH_ENABLED``, the token's verified
  claims) and answers with the user, the rooms it may join and data for
  its welcome frame, or refuses with a 4xx status, which becomes the HTTP
  refusal. It plugs into the node's ``Identify`` hook (``auth.make_identify``).
- the **publish hook** (``HOOK_PUBLISH_URL``) sees each client message
  before it is stored or delivered and answers accept, accept with other
  ``data``, or reject with a code and message (an ``error`` frame to the
  sender). It is the node's ``Screen`` (``realtime.core.screen``);
  trusted connections (``AUTH_TRUSTED_CLAIM``) skip it.

Every request carries ``Chat-Api-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<body>" with HOOK_SECRET>`` and must be answered within
``HOOK_TIMEOUT``. A hook that is down, slow, answers 5xx or nonsense has
failed: ``HOOK_FAILURE_POLICY`` says whether that refuses (HTTP 503 for a
connect, an ``unavailable`` error for a message) or lets it through as if
there were no hook. Failures are counted (``chat_api_hook_requests_total``)
and logged once when a hook starts failing and once when it answers again.
One aiohttp ``ClientSession`` per pod keeps its connections to the app open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict

from realtime import ACCEPT, Admission, Handshake, Identity, Refused, Reject, Replace
from realtime.core.access import clean_name
from realtime.core.histogram import LAG_BUCKETS, Histogram
from realtime.core.screen import Decision, Screen, Submission

from .auth import RoomPatterns, TokenError
from .config import Config

__all__ = [
    "CONNECT",
    "PUBLISH",
    "SIGNATURE_HEADER",
    "ConnectHook",
    "HookClient",
    "HookFailure",
    "HookHealth",
    "Hooks",
    "PublishHook",
    "sign",
]

log = logging.getLogger("chat_api.hooks")

CONNECT = "connect"
PUBLISH = "publish"
SIGNATURE_HEADER = "Chat-Api-Signature"
MAX_ANSWER_BYTES = 64 * 1024
"""A larger answer from the app is a failed hook request."""
MAX_REASON_LENGTH = 200
_CODE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_FAILURES = ("error", "invalid", "timeout")
RESULTS: Mapping[str, tuple[str, ...]] = {
    CONNECT: ("accept", "refuse", *_FAILURES),
    PUBLISH: ("accept", "replace", "reject", *_FAILURES),
}
"""The ``result`` labels of each hook's requests."""


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``Chat-Api-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class HookFailure(Exception):
    """A hook request that got no usable answer; ``result`` is its metrics
    label (``error``, ``invalid``, ``timeout``), ``detail`` what to log."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


@dataclass(slots=True)
class HookHealth:
    """One hook's counters, and whether it is failing (for the outage log)."""

    hook: str
    results: dict[str, int] = field(default_factory=dict)
    seconds: Histogram = field(default_factory=lambda: Histogram(LAG_BUCKETS))
    failing_since: float | None = None
    """Monotonic time of the first failure of the current outage."""
    failures: int = 0
    """Failed requests of the current outage."""

    def count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    def failed(self, failure: HookFailure, policy: str) -> None:
        self.count(failure.result)
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning(
                "%s hook failing (%s): %s, by HOOK_FAILURE_POLICY=%s, until it answers again",
                self.hook,
                failure.detail,
                "refusing" if policy == "refuse" else "letting through",
                policy,
                extra={"hook": self.hook, "result": failure.result, "policy": policy},
            )

    def answered(self, result: str) -> None:
        self.count(result)
        if self.failing_since is not None:
            log.info(
                "%s hook answering again after %d failed request(s) in %.1fs",
                self.hook,
                self.failures,
                time.monotonic() - self.failing_since,
                extra={"hook": self.hook, "failures": self.failures},
            )
            self.failing_since = None
            self.failures = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """What the app answered: its status, JSON body ({} if empty) and headers."""

    status: int
    body: Any
    headers: Mapping[str, str]


class HookClient:
    """The pod's one HTTP client to the app: signs, times out, keeps connections open."""

    def __init__(self, config: Config) -> None:
        self._secret = config.hook_secret.encode()
        self._timeout = config.hook_timeout
        self._pod_id = config.pod_id
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None),  # ours: asyncio.timeout below
                headers={"User-Agent": "chat-api"},
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, payload: Mapping[str, Any], health: HookHealth) -> Answer:
        """POST ``payload`` signed; the answer, or ``HookFailure``. Only
        2xx and 4xx are answers: anything else has failed."""
        session = self._session
        if session is None:
            raise HookFailure("error", "the hook client is not started")
        body = orjson.dumps(payload)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
            "Chat-Api-Pod": self._pod_id,
        }
        started = time.monotonic()
        try:
            async with (
                asyncio.timeout(self._timeout),
                session.post(url, data=body, headers=headers, allow_redirects=False) as resp,
            ):
                raw = await _read_bounded(resp)
                status = resp.status
                answer_headers = CIMultiDict(resp.headers)
                content_type = resp.content_type
        except TimeoutError:
            raise HookFailure("timeout", f"no answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise HookFailure("error", f"{type(exc).__name__}: {exc}") from None
        finally:
            health.seconds.observe(time.monotonic() - started)
        if not (200 <= status < 300 or 400 <= status < 500):
            raise HookFailure("error", f"HTTP {status}")
        parsed: Any = {}
        if raw.strip():
            if content_type == "application/json" or 200 <= status < 300:
                try:
                    parsed = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    if status < 300:
                        raise HookFailure("invalid", "the answer is not JSON") from None
            else:
                parsed = {"reason": raw.decode(errors="replace")}
        if status < 300 and not isinstance(parsed, dict):
            raise HookFailure("invalid", "the answer is not a JSON object")
        return Answer(status, parsed, answer_headers)


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    if (resp.content_length or 0) > MAX_ANSWER_BYTES:
        raise HookFailure("invalid", f"the answer is longer than {MAX_ANSWER_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(16384):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise HookFailure("invalid", f"the answer is longer than {MAX_ANSWER_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(body: Any, default: str) -> str:
    """The app's reason (``reason``, or FastAPI's ``detail``), printable and short."""
    found = None
    if isinstance(body, dict):
        found = next((v for k in ("reason", "detail") if isinstance(v := body.get(k), str)), None)
    if not found:
        return default
    cleaned = "".join(c if c.isprintable() else " " for c in found).strip()
    return cleaned[:MAX_REASON_LENGTH] or default


class ConnectHook:
    """The connect hook: the app admits or refuses each WebSocket upgrade."""

    def __init__(self, client: HookClient, config: Config) -> None:
        self._client = client
        self._url = config.hook_connect_url
        self._headers = tuple(name.lower() for name in config.hook_connect_headers)
        self._policy = config.hook_failure_policy
        self._pod_id = config.pod_id
        self.health = HookHealth(CONNECT)

    async def admit(
        self, handshake: Handshake, *, claims: Mapping[str, Any] | None, fallback: Admission
    ) -> Admission:
        """What the app decides for ``handshake``: an ``Admission``, or
        ``Refused`` with the app's 4xx status and reason. ``claims``: the
        token's verified claims (None: no token); ``fallback``: the token's
        (or a guest's) admission, which the app's answer refines and which
        stands when the hook fails and the policy allows."""
        payload = {
            "connection_id": handshake.connection_id,
            "pod": self._pod_id,
            "room": handshake.room,
            "remote": handshake.remote,
            "headers": {name: value for name in self._headers if (value := handshake.header(name))},
            "query": dict(handshake.query),
            "claims": None if claims is None else dict(claims),
        }
        try:
            answer = await self._client.post(self._url, payload, self.health)
            if answer.status >= 400:
                self.health.answered("refuse")
                raise _refusal(answer)
            granted = _admission(answer.body, fallback, token=claims is not None)
        except HookFailure as failure:
            self.health.failed(failure, self._policy)
            if self._policy == "allow":
                return fallback
            raise Refused(
                503, "sign-in is unavailable; try again later", headers={"Retry-After": "5"}
            ) from None
        self.health.answered("accept")
        return granted


def _refusal(answer: Answer) -> Refused:
    headers = {
        name: value
        for name in ("WWW-Authenticate", "Retry-After")
        if (value := answer.headers.get(name))
    }
    reason = _reason(answer.body, "refused by the application")
    return Refused(answer.status, reason, headers=headers)


def _admission(body: dict[str, Any], fallback: Admission, *, token: bool) -> Admission:
    """The connect hook's answer as an ``Admission`` (``HookFailure`` if invalid)."""
    identity = fallback.identity
    user = body.get("user")
    if user is not None:
        uid = user.get("id") if isinstance(user, dict) else None
        if not isinstance(uid, str) or not 0 < len(uid) <= 256:
            raise HookFailure("invalid", "the answer's user has no usable id")
        shown = user.get("name")
        name = clean_name(shown if isinstance(shown, str) else None) or clean_name(uid) or "user"
        identity = Identity(id=uid, name=name)
    elif not token:
        raise HookFailure("invalid", "the answer names no user")
    may_join = fallback.may_join
    if "rooms" in body:
        try:
            may_join = RoomPatterns.from_claim(body["rooms"])
        except TokenError:
            raise HookFailure("invalid", "the answer's rooms are not room names") from None
    trusted = body.get("trusted", fallback.trusted)
    if not isinstance(trusted, bool):
        raise HookFailure("invalid", "the answer's trusted is not true or false")
    return Admission(
        identity,
        expires_at=fallback.expires_at,
        may_join=may_join,
        trusted=trusted,
        data=body.get("data"),
        subject=fallback.subject,
    )


class PublishHook:
    """The publish hook: the app screens each client message (a ``Screen``)."""

    def __init__(self, client: HookClient, config: Config) -> None:
        self._client = client
        self._url = config.hook_publish_url
        self._policy = config.hook_failure_policy
        self._pod_id = config.pod_id
        self.health = HookHealth(PUBLISH)

    async def __call__(self, message: Submission) -> Decision:
        payload = {
            "room": message.room,
            "sender": message.sender.as_json(),
            "data": message.data,
            "key": message.key,
            "connection_id": message.connection_id,
            "pod": self._pod_id,
        }
        try:
            answer = await self._client.post(self._url, payload, self.health)
            decision = _decision(answer)
        except HookFailure as failure:
            self.health.failed(failure, self._policy)
            if self._policy == "allow":
                return ACCEPT
            return Reject("unavailable", "the message could not be checked; it was not sent")
        self.health.answered(
            "reject"
            if isinstance(decision, Reject)
            else "replace"
            if isinstance(decision, Replace)
            else "accept"
        )
        return decision


def _decision(answer: Answer) -> Decision:
    """The publish hook's answer as a ``Decision`` (``HookFailure`` if invalid)."""
    body = answer.body
    if answer.status >= 400:
        return Reject("rejected", _reason(body, "rejected by the application"))
    result = body.get("result", "accept")
    if result == "reject":
        code = body.get("code")
        return Reject(
            code if isinstance(code, str) and _CODE.fullmatch(code) else "rejected",
            _reason({"reason": body.get("message")}, "rejected by the application"),
        )
    if result != "accept":
        raise HookFailure("invalid", f"the answer's result is not accept or reject: {result!r}")
    return Replace(body["data"]) if "data" in body else ACCEPT


class Hooks:
    """The pod's hooks as configured (either may be None), on one client."""

    def __init__(self, config: Config) -> None:
        self._client = HookClient(config)
        self.connect = ConnectHook(self._client, config) if config.hook_connect_url else None
        self.publish = PublishHook(self._client, config) if config.hook_publish_url else None

    @classmethod
    def from_config(cls, config: Config) -> Hooks | None:
        """The hooks of ``config``, or None when no hook URL is set."""
        if not (config.hook_connect_url or config.hook_publish_url):
            return None
        return cls(config)

    @property
    def screen(self) -> Screen | None:
        """The node's publish screen (None without ``HOOK_PUBLISH_URL``)."""
        return self.publish

    @property
    def health(self) -> list[HookHealth]:
        return [hook.health for hook in (self.connect, self.publish) if hook is not None]

    async def start(self) -> None:
        await self._client.start()

    async def close(self) -> None:
        await self._client.close()
