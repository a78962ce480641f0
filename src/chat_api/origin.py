"""Which browser pages may open a WebSocket here (``ALLOWED_ORIGINS``).

Browsers send the page's ``Origin`` with every WebSocket handshake and let
any page connect anywhere, cookies included, so a server that does not check
it can be driven by a foreign page (cross-site WebSocket hijacking). Allowed:

- a handshake without ``Origin`` (not a browser: scripts, servers, CLIs);
- the origins listed in ``ALLOWED_ORIGINS``, or every origin with ``*``;
- the service's own origins, from what it knows it is, never from what the
  request claims: ``PUBLIC_URL`` (the address users reach it by, behind a
  proxy), and the page this pod serves itself: ``localhost``, ``127.0.0.1``,
  ``[::1]`` or the configured ``HOST``, on the port it listens on. (The
  request's ``Host`` is not trusted: a page of ``evil.example`` whose name is
  made to resolve to this pod — DNS rebinding — sends ``Host`` and
  ``Origin`` that agree.)

Anything else, ``Origin: null`` included, gets HTTP 403 before the upgrade.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from realtime import Handshake, Refused

__all__ = ["OriginPolicy", "parse_origin"]

log = logging.getLogger("chat_api.origin")

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})

Origin = tuple[str, str, int]


def parse_origin(value: str, *, path: bool = False) -> Origin | None:
    """``(scheme, host, port)`` of a serialized origin (with ``path``: of a
    URL, whatever its path), or None if it is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    if not path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


class OriginPolicy:
    """Decides whether a handshake's ``Origin`` may connect."""

    def __init__(
        self,
        allowed: tuple[str, ...] = (),
        *,
        public_url: str = "",
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(
            parsed for o in allowed if o != "*" and (parsed := parse_origin(o)) is not None
        )
        public = parse_origin(public_url, path=True) if public_url else None
        self.public = frozenset([public] if public is not None else [])
        name = host.strip("[]").lower()
        self._own_hosts = _LOOPBACK | (frozenset() if name in _ANY_ADDRESS else {name})
        self._port = port or None
        """The port this pod serves its page on; None: any (not known)."""

    def serving_at(self, port: int) -> None:
        """The port the pod listens on, once it is bound (``PORT=0``)."""
        self._port = port

    def allows(self, origin: str | None) -> bool:
        if origin is None or self.any:
            return True
        parsed = parse_origin(origin)
        if parsed is None:
            return False
        if parsed in self.allowed or parsed in self.public:
            return True
        _, name, port = parsed
        return name in self._own_hosts and (self._port is None or port == self._port)

    def check(self, handshake: Handshake) -> None:
        """Raise ``Refused`` (HTTP 403) unless the handshake's ``Origin`` is allowed."""
        origin = handshake.header("Origin")
        if not self.allows(origin):
            log.debug(
                "refused a WebSocket from origin %r",
                origin,
                extra={
                    "origin": origin,
                    "remote": handshake.remote,
                    "connection_id": handshake.connection_id,
                    "room": handshake.room,
                    "status": 403,
                },
            )
            raise Refused(403, "this origin may not open WebSockets here")
