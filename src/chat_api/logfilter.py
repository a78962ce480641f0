"""Malformed HTTP requests are the client's fault, not server errors.

aiohttp logs every request it cannot parse at ERROR, with a traceback and the
start of the offending line, which may hold a token (an over-long
``Authorization`` header or ``?access_token=``). Anyone can send those, so
they would fill the log with tracebacks and leak token prefixes. This filter
turns each into one DEBUG line naming the client, the exception type and the
status: no traceback, no request content.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["ClientErrorFilter", "install"]

SERVER_LOGGER = "aiohttp.server"


class ClientErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg = "refused a malformed HTTP request from %s: %s (HTTP %s)"
        record.args = (remote, type(exc).__name__, exc.code)
        record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Add the filter to aiohttp's server logger (once)."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
