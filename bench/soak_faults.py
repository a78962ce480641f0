"""The soak test's Redis topologies, its pods, and the faults it injects.

Each topology is started from the ``redis-server`` binary by the test
suite's helpers (``tests/redis_support.py``, ``tests/redis_topologies.py``)
and offers its own faults; every topology also has ``pod_kill``:

==============  ===============================================================
``pod_kill``     ``kill -9`` a pod; start it again (on a new port) 1-3 s later
``redis_restart`` standalone: ``kill -9`` Redis and start it again on its port
                 (append-only file, ``appendfsync always``: acked writes persist)
``redis_stall``  standalone: SIGSTOP Redis, SIGCONT 2-5 s later
``primary_failover`` Sentinel: ``kill -9`` the primary, the sentinels promote the
                 replica; 2-5 s later the old primary comes back as its replica
``primary_kill`` Cluster: ``kill -9`` a primary, its replica is promoted; 2-5 s
                 later the old primary comes back (as the new one's replica)
``slot_migrate`` Cluster: move the slot of a room (all of them are busy) to
                 another primary, keys and all, mid-traffic
==============  ===============================================================

A fault returns once the system is whole again (the pod serving, the set or
the Cluster healthy), so the next one finds a system that can fail over.
Each one is a blocking call: the soak runs it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from tests.redis_support import RedisServer, RedisStartError
from tests.redis_topologies import RedisCluster, SentinelSet

from realtime.backends.redis.slots import key_slot

from .cluster import Cluster, wait_until
from .soak_check import Fault

FAULT_ERRORS = (
    OSError,
    RuntimeError,
    RedisStartError,
    redis.RedisError,
    subprocess.SubprocessError,
)
"""What a fault that the harness could not carry out raises (TimeoutError is an OSError)."""

KINDS: dict[str, tuple[str, ...]] = {
    "standalone": ("pod_kill", "redis_restart", "redis_stall"),
    "sentinel": ("pod_kill", "primary_failover"),
    "cluster": ("pod_kill", "primary_kill", "slot_migrate"),
}
AOF = ("--appendonly", "yes", "--appendfsync", "always")


class SoakPods(Cluster):
    """chat-api pods that can be killed and started again."""

    restarts = 0

    def live_ports(self) -> list[int]:
        return [s.port for s in self.servers if s.popen.poll() is None]

    def kill(self, i: int) -> None:
        srv = self.servers[i]
        os.kill(srv.pid, signal.SIGKILL)
        srv.popen.wait(10)

    def restart(self, i: int) -> None:
        """Start pod ``i`` again (a new port: clients find it by asking again);
        its killed life's log is kept beside it."""
        old = self.servers[i]
        self.restarts += 1
        old.log.rename(old.log.with_suffix(f".{self.restarts}.log"))
        srv = self._start_pod(i)
        self.servers[i] = srv
        wait_until(lambda: self._check_alive(srv) and self.spec.ready(srv.port), 20, srv.name)


@dataclass
class Topology:
    """One Redis topology under a set of pods, and its faults."""

    kind: str
    redis: RedisServer | SentinelSet | RedisCluster

    @classmethod
    def start(cls, kind: str) -> Topology:
        redis: RedisServer | SentinelSet | RedisCluster
        if kind == "standalone":
            redis = RedisServer(extra=AOF)
        elif kind == "sentinel":
            redis = SentinelSet()
        elif kind == "cluster":
            redis = RedisCluster()
        else:
            raise ValueError(f"unknown topology {kind!r}")
        redis.start()
        return cls(kind, redis)

    @property
    def url(self) -> str:
        return self.redis.url

    def close(self) -> None:
        self.redis.close()

    def rooms(self, count: int) -> list[str]:
        """Room names; on a Cluster, dealt over the primaries in turn so
        every shard carries some."""
        if not isinstance(self.redis, RedisCluster):
            return [f"soak-{n}" for n in range(count)]
        primaries = self.redis.primaries()
        ranges = self.redis.slots()
        by_owner: dict[int, list[str]] = {p: [] for p in primaries}
        n = 0
        while sum(map(len, by_owner.values())) < count and n < 100_000:
            room = f"soak-{n}"
            n += 1
            slot = key_slot(room.encode())
            owner = next(p for s, e, p in ranges if s <= slot <= e)
            if len(by_owner[owner]) < -(-count // len(primaries)):
                by_owner[owner].append(room)
        dealt = [r for group in zip(*by_owner.values(), strict=False) for r in group]
        rest = [r for group in by_owner.values() for r in group if r not in dealt]
        return (dealt + rest)[:count]

    # -- faults ------------------------------------------------------------------

    def inject(self, kind: str, rng: random.Random, pods: SoakPods, rooms: list[str]) -> Fault:
        """Cause ``kind``, wait until the system is whole again; say what happened."""
        started = time.monotonic()
        if kind == "pod_kill":
            target, detail = self._pod_kill(rng, pods)
        elif kind == "redis_restart":
            target, detail = self._redis_restart()
        elif kind == "redis_stall":
            target, detail = self._redis_stall(rng)
        elif kind == "primary_failover":
            target, detail = self._primary_failover(rng)
        elif kind == "primary_kill":
            target, detail = self._primary_kill(rng)
        elif kind == "slot_migrate":
            target, detail = self._slot_migrate(rng, rooms)
        else:
            raise ValueError(f"unknown fault {kind!r}")
        return Fault(kind, target, started, time.monotonic(), detail)

    def _pod_kill(self, rng: random.Random, pods: SoakPods) -> tuple[str, str]:
        i = rng.randrange(len(pods.servers))
        name = pods.servers[i].name
        down = rng.uniform(1.0, 3.0)
        pods.kill(i)
        time.sleep(down)  # the outage itself: how long the pod stays dead
        pods.restart(i)
        return name, f"down {down:.1f}s, back on :{pods.servers[i].port}"

    def _redis_restart(self) -> tuple[str, str]:
        assert isinstance(self.redis, RedisServer)
        self.redis.kill()
        self.redis.start()
        return f"redis:{self.redis.port}", "kill -9, started again (AOF)"

    def _redis_stall(self, rng: random.Random) -> tuple[str, str]:
        assert isinstance(self.redis, RedisServer)
        stall = rng.uniform(2.0, 5.0)
        self.redis.pause()
        try:
            time.sleep(stall)  # the outage itself: how long Redis stays stopped
        finally:
            self.redis.resume()
        return f"redis:{self.redis.port}", f"SIGSTOP for {stall:.1f}s"

    def _primary_failover(self, rng: random.Random) -> tuple[str, str]:
        sentinels = self.redis
        assert isinstance(sentinels, SentinelSet)
        old = sentinels.primary_port()
        new = sentinels.kill_primary()
        promoted = time.monotonic()
        down = rng.uniform(2.0, 5.0)
        time.sleep(down)  # the outage itself: the old primary stays dead
        server = sentinels.server(old)
        server.extra = (*_without_replicaof(server.extra), "--replicaof", "127.0.0.1", str(new))
        server.start()
        sentinels.wait_ready()
        return f"primary:{old}", (
            f"replica {new} promoted; old primary back as its replica after {down:.1f}s "
            f"(healthy {time.monotonic() - promoted:.1f}s after the promotion)"
        )

    def _primary_kill(self, rng: random.Random) -> tuple[str, str]:
        cluster = self.redis
        assert isinstance(cluster, RedisCluster)
        victim = rng.choice(cluster.primaries())
        new = cluster.kill_primary(victim)
        down = rng.uniform(2.0, 5.0)
        time.sleep(down)  # the outage itself: the old primary stays dead
        cluster.node(victim).start()
        cluster.wait_healthy()
        return f"primary:{victim}", f"replica {new} promoted; {victim} back after {down:.1f}s"

    def _slot_migrate(self, rng: random.Random, rooms: list[str]) -> tuple[str, str]:
        cluster = self.redis
        assert isinstance(cluster, RedisCluster)
        room = rng.choice(rooms)
        slot = key_slot(room.encode())
        source = next(p for s, e, p in cluster.slots() if s <= slot <= e)
        target = rng.choice([p for p in cluster.primaries() if p != source])
        cluster.migrate_slot(slot, target)
        return f"slot:{slot}", f"room {room} from {source} to {target}"

    def save_logs(self, dest: Path) -> None:
        """Copy every Redis process's log into ``dest`` (they live in
        directories that ``close`` removes)."""
        logs: list[str]
        if isinstance(self.redis, RedisServer):
            logs = [self.redis.log_path]
        elif isinstance(self.redis, SentinelSet):
            logs = [s.log_path for s in self.redis.servers]
            logs += [s.log_path for s in self.redis.sentinels]
        else:
            logs = [n.log_path for n in self.redis.nodes]
        dest.mkdir(parents=True, exist_ok=True)
        for n, log in enumerate(logs):
            with contextlib.suppress(OSError):
                shutil.copyfile(log, dest / f"redis-{n}-{Path(log).name}")


def _without_replicaof(extra: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    skip = 0
    for arg in extra:
        if skip:
            skip -= 1
        elif arg == "--replicaof":
            skip = 2
        else:
            out.append(arg)
    return tuple(out)
