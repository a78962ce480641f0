"""Where the Redis of a deployment is: one server, a Sentinel set, or a Cluster.

``Topology.from_url`` reads the one URL the backend takes:

================================================================  =====================
``redis://[user:password@]host:port[/db]``, ``rediss://``,         one server
``unix:///path.sock``
``redis+sentinel://[user:password@]host:port[,host:port…]/name[/db]``  a primary found
``rediss+sentinel://…``                                             through sentinels
``redis+cluster://[user:password@]host:port[,host:port…]``          a Cluster, from
``rediss+cluster://…``                                              seed nodes
================================================================  =====================

The credentials and TLS options of the URL are the data nodes'. Sentinels
take their own from the query (``sentinel_username``, ``sentinel_password``;
none by default, as a sentinel usually has none); ``ssl_cert_reqs`` and
``ssl_ca_certs`` apply to every connection. A Cluster has no databases.

``locate`` answers "which node serves which slots, now": for one server and
a Sentinel set, one primary serving every slot; for a Cluster, the slot map
of ``CLUSTER SLOTS``. The backend asks again whenever a link is lost, a
node answers ``MOVED`` or ``READONLY``, or a shard unsubscribes a channel.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from redis.exceptions import ResponseError

from ...core.exceptions import BroadcastError
from .link import open_link
from .resp import LINK_ERRORS, RedisAddress, describe, pack_command
from .slots import SLOTS

__all__ = ["Shard", "Topology"]


@dataclass(frozen=True, slots=True)
class Shard:
    """One primary and the slot ranges it serves (inclusive)."""

    address: RedisAddress
    ranges: tuple[tuple[int, int], ...]

    @property
    def key(self) -> str:
        """``host:port`` (or the socket path): names the shard in logs and stats."""
        return self.address.label


@dataclass(frozen=True, slots=True)
class Topology:
    """How to find the primaries: ``kind`` is ``standalone``, ``sentinel`` or ``cluster``."""

    kind: str
    nodes: tuple[RedisAddress, ...]
    """The server; the sentinels; or the Cluster's seed nodes."""
    node: RedisAddress
    """Credentials, TLS and database for the data nodes (host and port are
    replaced by each node's)."""
    service: str = ""
    """The Sentinel set's name for the primary (``SENTINEL get-master-addr-by-name``)."""

    @property
    def sharded(self) -> bool:
        """A Cluster: rooms are spread over shards, with sharded pub/sub."""
        return self.kind == "cluster"

    @classmethod
    def from_url(cls, url: str) -> Topology:
        scheme, sep, rest = url.partition("://")
        scheme = scheme.lower()
        if not sep:
            raise BroadcastError("invalid Redis URL: no scheme")
        if scheme in ("redis", "rediss", "unix"):
            address = RedisAddress.from_url(url)
            return cls("standalone", (address,), address)
        base, _, kind = scheme.partition("+")
        if base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
            raise BroadcastError(
                f"invalid Redis URL: unknown scheme {scheme + '://'!r} (redis://, rediss://, "
                "unix://, redis+sentinel://, rediss+sentinel://, redis+cluster://, "
                "rediss+cluster://)"
            )
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not at:
            hosts, userinfo = netloc, ""
        params = dict(parse_qsl(query, keep_blank_values=True))
        sentinel_auth = {
            "username": params.pop("sentinel_username", None) or None,
            "password": params.pop("sentinel_password", None) or None,
        }
        # Everything but the hosts and path as a one-server URL: redis-py's
        # parser reads the credentials and TLS options the same way as for redis://.
        plain = f"{base}://{userinfo}{at}localhost"
        if params:
            plain += "?" + "&".join(f"{k}={v}" for k, v in params.items())
        template = RedisAddress.from_url(plain)
        endpoints = tuple(_endpoint(h, template) for h in hosts.split(",") if h.strip())
        if not endpoints:
            raise BroadcastError(f"invalid Redis URL: no host in {scheme}://")
        parts = [p for p in path.split("/") if p]
        if kind == "cluster":
            if parts:
                raise BroadcastError(
                    "invalid Redis URL: a Cluster has no database (nothing after the hosts)"
                )
            return cls("cluster", endpoints, template)
        if not parts or len(parts) > 2:
            raise BroadcastError(
                "invalid Redis URL: redis+sentinel://host:port[,host:port…]/<master-name>[/db]"
            )
        service = unquote(parts[0])
        db = 0
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise BroadcastError(f"invalid Redis URL: database {parts[1]!r} is not a number")
            db = int(parts[1])
        sentinels = tuple(
            dataclasses.replace(
                e, db=0, username=sentinel_auth["username"], password=sentinel_auth["password"]
            )
            for e in endpoints
        )
        return cls("sentinel", sentinels, dataclasses.replace(template, db=db), service)

    def at(self, host: str, port: int) -> RedisAddress:
        """The address of a data node at ``host:port``."""
        return dataclasses.replace(self.node, host=host, port=port, path=None)

    async def locate(self, timeout: float, prefer: Sequence[RedisAddress] = ()) -> list[Shard]:
        """The primaries now and the slots each serves. Raises ``BroadcastError``
        when no node (or sentinel) can answer. ``prefer``: Cluster nodes to
        ask first (those the pod knows are up)."""
        if self.kind == "standalone":
            return [Shard(self.node, ((0, SLOTS - 1),))]
        if self.kind == "sentinel":
            return [Shard(await self._sentinel_primary(timeout), ((0, SLOTS - 1),))]
        return await self._cluster_slots(timeout, prefer)

    async def _sentinel_primary(self, timeout: float) -> RedisAddress:
        command = pack_command(b"SENTINEL", b"get-master-addr-by-name", self.service.encode())
        errors = []
        for sentinel in self.nodes:
            try:
                reply = await _ask(sentinel, command, timeout)
            except LINK_ERRORS as exc:
                errors.append(f"{sentinel.label}: {describe(exc)}")
                continue
            if isinstance(reply, ResponseError):
                errors.append(f"{sentinel.label}: {reply}")
                continue
            if reply is None:
                errors.append(f"{sentinel.label}: no primary named {self.service!r}")
                continue
            host, port = reply
            return self.at(_text(host), int(port))
        raise BroadcastError("no sentinel named the primary (" + "; ".join(errors) + ")")

    async def _cluster_slots(self, timeout: float, prefer: Sequence[RedisAddress]) -> list[Shard]:
        command = pack_command(b"CLUSTER", b"SLOTS")
        errors = []
        seen: set[str] = set()
        for node in [*prefer, *self.nodes]:
            if node.label in seen:
                continue
            seen.add(node.label)
            try:
                reply = await _ask(node, command, timeout)
            except LINK_ERRORS as exc:
                errors.append(f"{node.label}: {describe(exc)}")
                continue
            if isinstance(reply, ResponseError):
                errors.append(f"{node.label}: {reply}")
                continue
            shards = self._shards(reply, node)
            covered = sum(end - start + 1 for s in shards for start, end in s.ranges)
            if covered < SLOTS:
                errors.append(f"{node.label}: {SLOTS - covered} slots have no primary")
                continue
            return shards
        raise BroadcastError("no Cluster node gave a full slot map (" + "; ".join(errors) + ")")

    def _shards(self, reply: Any, asked: RedisAddress) -> list[Shard]:
        ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for start, end, primary, *_replicas in reply:
            host = _text(primary[0]) or asked.host  # an empty host: the node asked
            ranges.setdefault((host, int(primary[1])), []).append((int(start), int(end)))
        return [
            Shard(self.at(host, port), tuple(sorted(spans)))
            for (host, port), spans in sorted(ranges.items())
        ]


def _endpoint(text: str, template: RedisAddress) -> RedisAddress:
    text = text.strip()
    if text.startswith("["):  # [::1]:26379
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = text.rpartition(":")
        if not _:
            host, port = text, ""
    if not host:
        raise BroadcastError(f"invalid Redis URL: no host in {text!r}")
    if port and not port.isdigit():
        raise BroadcastError(f"invalid Redis URL: port {port!r} is not a number")
    number = int(port) if port else 6379
    if not 0 < number < 65536:
        raise BroadcastError(f"invalid Redis URL: port {number} is out of range")
    return dataclasses.replace(template, host=host, port=number, path=None)


async def _ask(address: RedisAddress, command: bytes, timeout: float) -> Any:
    """One command on a short-lived connection (with the address's
    credentials): its reply, an error reply as ``ResponseError``."""
    link = await open_link(address, _ignore, client_name="", timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            (reply,) = await link.call(command, 1)
        return reply
    finally:
        link.abort()


def _ignore(channel: bytes, data: bytes) -> None:
    pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
