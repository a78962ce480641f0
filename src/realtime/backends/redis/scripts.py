"""The backend's Lua scripts: files in ``lua/``, read once when first used.

Each script runs atomically on the Redis that owns its keys (one room's keys
share a hash slot, so one script never touches two slots). They are run by
SHA (``EVALSHA``) and loaded again whenever Redis answers ``NOSCRIPT``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from importlib import resources

from ..base import PRESENCE_BURST

__all__ = ["APPEND", "PRESENCE_MEMBERS", "PRESENCE_REFRESH", "PRESENCE_UPDATE", "READ", "Script"]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


@functools.cache
def _text(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


def _load(name: str, *, prelude: str | None = None) -> Script:
    source = _text(name)
    if prelude is not None:
        source = _text(prelude).replace("@BURST@", str(PRESENCE_BURST)) + source
    return Script(name, source)


APPEND = _load("append")
"""Stamp a room message with the room's next offset, store it, publish it."""
READ = _load("read")
"""A room's epoch, newest and oldest offsets and a range of its history."""
PRESENCE_UPDATE = _load("presence_update", prelude="presence_common")
PRESENCE_REFRESH = _load("presence_refresh", prelude="presence_common")
PRESENCE_MEMBERS = _load("presence_members")
