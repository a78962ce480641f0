"""A Redis Cluster and a Sentinel set for tests, from the ``redis-server`` binary.

``RedisCluster`` starts six nodes with ``--cluster-enabled yes`` on free
ports whose cluster bus ports (port + 10000) are free too, joins them with
``CLUSTER MEET``, gives the three primaries a third of the slots each and
makes each of the other three a replica of one (what ``redis-cli --cluster
create … --cluster-replicas 1`` does, without needing ``redis-cli``). The
node timeout is short, so a killed primary's replica takes over in a few
seconds. ``migrate_slot`` moves one slot with its keys the way ``redis-cli
--cluster reshard`` does (``SETSLOT IMPORTING/MIGRATING``, ``MIGRATE``,
``SETSLOT NODE``).

``SentinelSet`` starts a primary, a replica and three sentinels
(``redis-server <conf> --sentinel``) watching it under the name
``mymaster``, and waits until the sentinels know the replica and each other,
so a failover can happen.

Every wait is on a condition with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import redis

from realtime.backends.redis.slots import SLOTS, key_slot

from .redis_support import REDIS_SERVER, START_TIMEOUT, RedisServer, RedisStartError

NODE_TIMEOUT_MS = 1000
"""``cluster-node-timeout``: a primary is failed over about two of these after it dies."""


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` (a Redis query, cheap) until it holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)  # polling interval for a Redis-side condition
    raise TimeoutError(f"{what} did not happen within {timeout}s (last error: {last})")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _client(port: int, timeout: float = 5) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout
    )


class RedisCluster:
    """Three primaries with a replica each, on 127.0.0.1."""

    def __init__(self, primaries: int = 3) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self.count = primaries
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        seeds = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])
        return f"redis+cluster://{seeds}"

    def start(self) -> RedisCluster:
        try:
            for _ in range(2 * self.count):
                port = cluster_port()
                node = RedisServer(
                    port=port,
                    extra=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                        "--cluster-replica-validity-factor", "0",
                        "--cluster-require-full-coverage", "no",
                        "--cluster-allow-reads-when-down", "no",
                        "--repl-diskless-sync-delay", "0",
                    ),
                )  # fmt: skip
                self.nodes.append(node.start())
            self._form()
        except BaseException:
            self.close()
            raise
        return self

    def _form(self) -> None:
        first = self.nodes[0]
        for node in self.nodes[1:]:
            first.command("CLUSTER", "MEET", "127.0.0.1", node.port)
        span = SLOTS // self.count
        for i, node in enumerate(self.nodes[: self.count]):
            start = i * span
            end = SLOTS - 1 if i == self.count - 1 else (i + 1) * span - 1
            node.command("CLUSTER", "ADDSLOTSRANGE", start, end)
        wait_for(
            lambda: all(len(self._nodes_of(n.port)) == len(self.nodes) for n in self.nodes),
            START_TIMEOUT,
            "the Cluster nodes meeting each other",
        )
        for primary, replica in zip(
            self.nodes[: self.count], self.nodes[self.count :], strict=True
        ):
            node_id = primary.command("CLUSTER", "MYID").decode()
            wait_for(
                lambda r=replica, i=node_id: bool(r.command("CLUSTER", "REPLICATE", i)),
                START_TIMEOUT,
                f"node {replica.port} replicating {primary.port}",
            )
        self.wait_healthy()

    def _nodes_of(self, port: int) -> list[list[str]]:
        text = _client(port).execute_command("CLUSTER", "NODES").decode()
        return [line.split() for line in text.splitlines() if line.strip()]

    def alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every live node says ``cluster_state:ok``, and every primary has a
        replica in sync."""

        def healthy() -> bool:
            for node in self.alive():
                info = node.command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
            for node in self.alive():
                replication = _client(node.port).info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
            return True

        wait_for(healthy, timeout, "the Cluster becoming healthy")

    # -- where things are ----------------------------------------------------

    def slots(self, port: int | None = None) -> list[tuple[int, int, int]]:
        """``(start, end, primary port)`` for each slot range, as a live node sees it."""
        asked = port or self.alive()[0].port
        reply = _client(asked).execute_command("CLUSTER", "SLOTS")
        return [(int(r[0]), int(r[1]), int(r[2][1])) for r in reply]

    def primaries(self) -> list[int]:
        return sorted({p for _, _, p in self.slots()})

    def owner(self, key: bytes) -> int:
        """The port of the primary that serves ``key`` (or a shard channel)."""
        slot = key_slot(key)
        for start, end, port in self.slots():
            if start <= slot <= end:
                return port
        raise LookupError(f"slot {slot} has no primary")

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def shardnumsub(self, port: int, channel: str) -> int:
        reply = _client(port).execute_command("PUBSUB", "SHARDNUMSUB", channel)
        return int(reply[1])

    def numsub(self, port: int, channel: str) -> int:
        reply = _client(port).execute_command("PUBSUB", "NUMSUB", channel)
        return int(reply[1])

    def shardchannels(self, port: int, pattern: str = "*") -> set[str]:
        reply = _client(port).execute_command("PUBSUB", "SHARDCHANNELS", pattern)
        return {c.decode() for c in reply}

    def channels(self, port: int, pattern: str = "*") -> set[str]:
        reply = _client(port).execute_command("PUBSUB", "CHANNELS", pattern)
        return {c.decode() for c in reply}

    def command(self, port: int, *args: Any) -> Any:
        with _client(port) as client:
            return client.execute_command(*args)

    # -- faults ----------------------------------------------------------------

    def kill_primary(self, port: int) -> int:
        """``kill -9`` the primary at ``port``; wait until its replica serves
        its slots; return the new primary's port."""
        ranges = [(s, e) for s, e, p in self.slots() if p == port]
        self.node(port).kill()

        def promoted() -> bool:
            owners = {p for s, e, p in self.slots() if (s, e) in ranges}
            return bool(owners) and port not in owners

        wait_for(promoted, 30, f"a replica taking over from {port}")
        self.wait_healthy()
        return next(p for s, e, p in self.slots() if (s, e) == ranges[0])

    def migrate_slot(self, slot: int, to_port: int, *, batch: int = 10) -> None:
        """Move ``slot`` and its keys to the primary at ``to_port`` (what
        ``redis-cli --cluster reshard`` does for one slot)."""
        from_port = next(p for s, e, p in self.slots() if s <= slot <= e)
        if from_port == to_port:
            return
        source, target = _client(from_port), _client(to_port)
        source_id = source.execute_command("CLUSTER", "MYID").decode()
        target_id = target.execute_command("CLUSTER", "MYID").decode()
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
            source.execute_command(
                "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "REPLACE", "KEYS", *keys
            )
        for port in self.primaries():
            _client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_for(
            lambda: all(
                any(s <= slot <= e and p == to_port for s, e, p in self.slots(n.port))
                for n in self.alive()
            ),
            START_TIMEOUT,
            f"every node seeing slot {slot} on {to_port}",
        )

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class Sentinel:
    """One ``redis-server --sentinel`` process."""

    def __init__(self, directory: str, primary_port: int, quorum: int) -> None:
        self.port = free_sentinel_port()
        self.config = os.path.join(directory, f"sentinel-{self.port}.conf")
        with open(self.config, "w") as f:
            f.write(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                f"dir {directory}\n"
                f"sentinel monitor mymaster 127.0.0.1 {primary_port} {quorum}\n"
                "sentinel down-after-milliseconds mymaster 500\n"
                "sentinel failover-timeout mymaster 3000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
        self.log_path = os.path.join(directory, f"sentinel-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sentinel:
        assert REDIS_SERVER is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, self.config, "--sentinel"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_for(lambda: bool(_client(self.port, 1).ping()), START_TIMEOUT, "a sentinel")
        except TimeoutError:
            with open(self.log_path, errors="replace") as log:
                raise RedisStartError(f"sentinel did not start:\n{log.read()[-2000:]}") from None
        return self

    def command(self, *args: Any) -> Any:
        with _client(self.port) as client:
            return client.execute_command(*args)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(START_TIMEOUT)


def free_sentinel_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SentinelSet:
    """A primary, a replica and three sentinels watching them as ``mymaster``."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on PATH")
        self._dir = tempfile.TemporaryDirectory(prefix="chat-api-sentinel-")
        self.servers: list[RedisServer] = []
        self.sentinels: list[Sentinel] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/mymaster"

    def start(self) -> SentinelSet:
        try:
            quick = ("--repl-diskless-sync-delay", "0")
            primary = RedisServer(extra=quick).start()
            self.servers.append(primary)
            replica = RedisServer(
                extra=(*quick, "--replicaof", "127.0.0.1", str(primary.port))
            ).start()
            self.servers.append(replica)
            self.sentinels = [
                Sentinel(self._dir.name, primary.port, quorum=2).start() for _ in range(3)
            ]
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def primary_port(self) -> int:
        _, port = self.sentinels[0].command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        return int(port)

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every sentinel knows the primary, a replica in sync and the two
        other sentinels (a failover needs them)."""
        primary = self.primary_port()

        def ready() -> bool:
            for sentinel in self.sentinels:
                if sentinel.proc is None or sentinel.proc.poll() is not None:
                    continue
                _, port = sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
                if int(port) != primary:
                    return False
                replicas = sentinel.command("SENTINEL", "REPLICAS", "mymaster")
                flags = [_field(r, b"flags") for r in replicas]
                if not any(f is not None and b"s_down" not in f for f in flags):
                    return False
                if len(sentinel.command("SENTINEL", "SENTINELS", "mymaster")) < 2:
                    return False
            return all(
                _client(s.port).info("replication").get("master_link_status") == "up"
                for s in self.servers
                if s.port != primary and s.proc is not None and s.proc.poll() is None
            )

        wait_for(ready, timeout, "the sentinels knowing the replica and each other")

    def kill_primary(self) -> int:
        """``kill -9`` the primary; wait until the sentinels promote the
        replica; return its port."""
        old = self.primary_port()
        self.server(old).kill()
        wait_for(lambda: self.primary_port() != old, 30, "a failover to the replica")
        new = self.primary_port()
        wait_for(
            lambda: _client(new).info("replication")["role"] == "master",
            10,
            "the replica becoming a primary",
        )
        return new

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.close()
        self._dir.cleanup()


def _field(entry: Any, name: bytes) -> bytes | None:
    """A field of a ``SENTINEL REPLICAS`` entry (a flat name/value list or a dict)."""
    if isinstance(entry, dict):
        value = entry.get(name) or entry.get(name.decode())
        return value.encode() if isinstance(value, str) else value
    items = list(entry)
    for i in range(0, len(items) - 1, 2):
        if items[i] == name:
            return bytes(items[i + 1])
    return None
