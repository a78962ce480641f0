"""How the service's log lines look: ``LOG_FORMAT=text`` or ``json``.

``configure`` puts one handler on the root logger, so every line the process
writes — chat-api's, realtime's, aiohttp's, redis-py's, asyncio's (uvloop
reports through it), warnings and uncaught exceptions — has the same format
on stderr.

- **text**: ``2026-11-27 10:00:00,123 INFO chat_api: message`` (for people).
- **json**: one object per line: ``time`` (ISO 8601, UTC, milliseconds),
  ``level``, ``logger``, ``message``, ``pod``, the event's fields (whatever
  the call passed as ``extra=``: ``connection_id``, ``room``, ``close_code``,
  ``redis`` (the address, password redacted) ...) and ``exception`` (the
  traceback as one string) when there is one.

Whatever the format, the values of the secret settings (``AUTH_JWT_SECRET``,
``STATS_TOKEN``, ``PUBLISH_API_KEY``, the password in ``REDIS_URL``) are
replaced by ``***`` wherever they would appear: the code logs none, and this
keeps a library's message (an address with its password, say) from leaking
one either.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson

__all__ = ["JsonFormatter", "TextFormatter", "configure"]

# The attributes every LogRecord has; anything else came with ``extra=``.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class _Scrubber:
    def __init__(self, secrets: Sequence[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, secrets scrubbed."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._scrub = _Scrubber(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self._scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, secrets scrubbed."""

    def __init__(self, pod_id: str, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self._pod_id = pod_id
        self._scrub = _Scrubber(secrets)

    def format(self, record: logging.LogRecord) -> str:
        scrub = self._scrub
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
            "pod": self._pod_id,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in entry:
                entry[key] = _clean(value, scrub)
        if record.exc_info:
            entry["exception"] = scrub(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = scrub(self.formatStack(record.stack_info))
        line = orjson.dumps(entry, default=str).decode()
        return scrub(line)


def _clean(value: Any, scrub: _Scrubber) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_clean(v, scrub) for v in value]
    return scrub(str(value))


def configure(
    level: int, fmt: str = "text", *, pod_id: str = "", secrets: Sequence[str] = ()
) -> logging.Handler:
    """Send every logger's records to stderr in ``fmt`` (``text`` or ``json``)
    at ``level`` and above; returns the handler (replacing any earlier one)."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter(pod_id, secrets) if fmt.lower() == "json" else TextFormatter(secrets)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    return handler


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("chat_api").critical("uncaught exception", exc_info=(kind, exc, tb))
