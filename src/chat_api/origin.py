"""Which browser pages may open a WebSocket here (``ALLOWED_ORIGINS``).

Browsers send the page's ``Origin`` with every WebSocket handshake and let
any page connect anywhere, cookies included, so a server that does not check
it can be driven by a foreign page (cross-site WebSocket hijacking). Allowed:

- a handshake without ``Origin`` (not a browser: scripts, servers, CLIs);
- the service's own origin: the Origin's host and port equal the request's
  ``Host`` (a TLS-terminating proxy must pass ``Host`` through);
- the origins listed in ``ALLOWED_ORIGINS``, or every origin with ``*``.

Anything else, ``Origin: null`` included, gets HTTP 403 before the upgrade.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from realtime import Handshake, Refused

__all__ = ["OriginPolicy"]

log = logging.getLogger("chat_api.origin")

_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


def _parse_origin(value: str) -> Origin | None:
    """``(scheme, host, port)`` of a serialized origin, or None if it is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


def _parse_host(value: str, default_port: int) -> tuple[str, int] | None:
    try:
        parts = urlsplit("//" + value.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or default_port


class OriginPolicy:
    """Decides whether a handshake's ``Origin`` may connect."""

    def __init__(self, allowed: tuple[str, ...] = ()) -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(
            parsed for o in allowed if o != "*" and (parsed := _parse_origin(o)) is not None
        )

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self.any:
            return True
        parsed = _parse_origin(origin)
        if parsed is None:
            return False
        if parsed in self.allowed:
            return True
        scheme, name, port = parsed
        own = None if host is None else _parse_host(host, _DEFAULT_PORTS[scheme])
        return own == (name, port)

    def check(self, handshake: Handshake) -> None:
        """Raise ``Refused`` (HTTP 403) unless the handshake's ``Origin`` is allowed."""
        origin = handshake.header("Origin")
        if not self.allows(origin, handshake.header("Host")):
            log.debug("refused a WebSocket from origin %r", origin)
            raise Refused(403, "this origin may not open WebSockets here")
