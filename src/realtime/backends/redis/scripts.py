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

SEQ_MARGIN_MS = 1000
"""How much longer than its history stream a room's ``seq`` hash lives (ms):
a stream never outlives the hash that names its epoch."""
PLAIN_TAIL = 8
"""A pod appends at most this many messages of one room at a time with plain
``XADD``s before their ``PUBLISH``es (more go through the append script); the
presence refresh that prunes a dead pod publishes each of its rooms' last this
many entries again, in case it died in between."""

__all__ = [
    "APPEND",
    "PLAIN_TAIL",
    "PRESENCE_MEMBERS",
    "PRESENCE_REFRESH",
    "PRESENCE_UPDATE",
    "READ",
    "REBASE",
    "SCRIPTS",
    "SEQ_MARGIN_MS",
    "Script",
    "quiet",
    "sharded",
    "with_constants",
]


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


def with_constants(source: str) -> str:
    """Lua ``source`` with the constants it shares with Python filled in
    (``@BURST@``, ``@TAIL@``, ``@SEQ_MARGIN@``)."""
    for constant, value in (
        ("BURST", PRESENCE_BURST),
        ("TAIL", PLAIN_TAIL),
        ("SEQ_MARGIN", SEQ_MARGIN_MS),
    ):
        source = source.replace(f"@{constant}@", str(value))
    return source


def _load(name: str, *, prelude: str | None = None) -> Script:
    source = _text(name)
    if prelude is not None:
        source = _text(prelude) + source
    return Script(name, with_constants(source))


APPEND = _load("append", prelude="room_common")
"""Stamp a room message with the room's next offset, store it, publish it."""
READ = _load("read", prelude="room_common")
"""A room's epoch, newest and oldest offsets and a range of its history."""
PRESENCE_UPDATE = _load("presence_update", prelude="presence_common")
PRESENCE_REFRESH = _load("presence_refresh", prelude="presence_common")
PRESENCE_MEMBERS = _load("presence_members")
REBASE = _load("rebase", prelude="room_common")
"""Move a room that Redis set back (a failover lost writes) to a new epoch."""
SCRIPTS = (APPEND, READ, REBASE, PRESENCE_UPDATE, PRESENCE_REFRESH, PRESENCE_MEMBERS)


@functools.cache
def quiet(script: Script) -> Script:
    """``script`` without its publishes (the pod publishes what it stored once
    replicas have it: see ``Publisher``)."""
    lines = [line for line in script.source.splitlines() if "redis.call('PUBLISH'," not in line]
    return Script(script.name, "\n".join(lines) + "\n")


@functools.cache
def sharded(script: Script) -> Script:
    """``script`` for a Cluster: its publishes on sharded channels (``SPUBLISH``)."""
    source = script.source.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
    return script if source == script.source else Script(script.name, source)
