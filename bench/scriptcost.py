"""What the room-log script costs Redis, and what part of it is the script.

    python -m bench.scriptcost                 # about 40 s
    python -m bench.scriptcost --against OLD.lua --layout counters --batch 8

A private redis-server, two subscribers on every room channel (two pods),
500 rooms whose histories are full (so every append trims), and one client
calling, one at a time: the append script as pods call it (a pod that has
seen the room), an empty script with the same keys and arguments, a script
that only publishes, a plain ``PUBLISH``, and the script's common path
without a script (``XADD`` and ``PUBLISH`` per message, pipelined); then a
pod's presence refresh of ``REFRESH_ROOMS`` rooms where two pods have
members, as one refresh in three makes it (the keys' TTLs too) and as the
other two do (the pod's expiry only), back to back only. Each is
measured back to back and paced (1,000 calls/s, so Redis sleeps between
calls, as it does under chat traffic at low rates). The figure is Redis's
own time for the call (``INFO commandstats``: ``usec`` per call, the
script's inner commands included). ``--against`` measures another append
script beside this one (an earlier checkout's ``lua/append.lua``;
``--layout`` names the arguments it takes: ``counters`` for 21442ef to
5fa679e, ``offset`` before that); ``--batch`` puts that many rooms'
messages in each append call (and in each pipeline), as a busy pod does
(those rows then also say µs per message).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from realtime.backends.redis.presence import REFRESH_ROOMS
from realtime.backends.redis.scripts import (
    APPEND,
    PRESENCE_REFRESH,
    PRESENCE_UPDATE,
    with_constants,
)

from .cluster import HOST, start_redis

ROOMS = 500
BODY = b'"room":"r","data":{"text":"hello there, a chat message"},"from":"u1","id":"m"}'
HEAD = b"pod-a\n"
EMPTY = "return {1, 'e', 0}"
PUBLISH_ONLY = "redis.call('PUBLISH', ARGV[7], ARGV[5] .. '1:e\\n' .. ARGV[8])\nreturn {1, 'e', 0}"

Call = Callable[[int], None]


def _keys(tag: str, i: int, epoch: str = "") -> list[str]:
    room = f"{{{tag}{i % ROOMS}}}"
    return [f"{room}:seq", f"{room}:hist:{epoch}", f"{room}:keys", f"{room}:order"]


def _append(client: redis.Redis, sha: str, tag: str, *, layout: str, batch: int) -> Call:
    """Calls of an append script, ``batch`` rooms a call, as a pod that has
    seen each room makes them (``layout``: the arguments of which version)."""
    seen: dict[int, tuple[str, str]] = {}

    def call(i: int) -> None:
        keys: list[str] = []
        rooms = [(i * batch + j) % ROOMS for j in range(batch)]
        if layout == "streams":  # this checkout: the epoch names the stream
            args: list[object] = [3_600_000, 100, 1 << 20, 1000, HEAD, "0123456789abcdef"]
            for room in rooms:
                offset, epoch = seen.get(room, ("", ""))
                keys += _keys(tag, room, epoch)
                args += [f"ch{room}", BODY, offset, epoch, 0 if epoch else 1]
        else:
            args = [3_600_000, 100, 1 << 20, 1000, HEAD]
            if layout == "offset":
                args.append(int(time.time() * 1000))
            for room in rooms:
                seq, _, keyed, order = _keys(tag, room)
                keys += [seq, f"{{{tag}{room}}}:hist", keyed, order]
                offset, epoch = seen.get(room, ("", ""))
                last = f"{offset}:{epoch}" if epoch else ""
                if layout == "offset":
                    args += [f"ch{room}", "0123456789abcdef", BODY, "", "", last]
                else:
                    args += [f"ch{room}", "0123456789abcdef", BODY, last, 0 if last else 1]
        reply = client.evalsha(sha, len(keys), *keys, *args)
        for j, room in enumerate(rooms):
            seen[room] = (str(int(reply[3 * j])), reply[3 * j + 1].decode())

    return call


def _source(path: Path) -> str:
    """An append.lua as Redis runs it: with the prelude it uses from its own
    folder (``room_common.lua``, this version on), if any."""
    text = path.read_text()
    if "history_key(" in text and "function history_key" not in text:
        text = (path.parent / "room_common.lua").read_text() + text
    return with_constants(text)


def _plain(client: redis.Redis, batch: int) -> Call:
    """What the script's common path does, without a script: ``batch``
    rooms' ``XADD ... NOMKSTREAM 0-*`` and ``PUBLISH`` in one pipeline (the
    offset in the envelope a stand-in: a real design would need the
    ``XADD`` replies first)."""
    for room in range(ROOMS):
        key = f"{{p{room}}}:hist:e"
        client.delete(key)
        client.xadd(key, {"b": BODY}, id="0-1")

    def plain(i: int) -> None:
        pipe = client.pipeline(transaction=False)
        for j in range(batch):
            room = (i * batch + j) % ROOMS
            key = f"{{p{room}}}:hist:e"
            pipe.execute_command("XADD", key, "NOMKSTREAM", "MAXLEN", "~", 100, "0-*", "b", BODY)
            pipe.execute_command("PUBLISH", f"ch{room}", HEAD + b"1:e\n" + BODY)
        pipe.execute()

    return plain


def _script(client: redis.Redis, sha: str) -> Call:
    def call(i: int) -> None:
        channel = f"ch{i % ROOMS}"
        client.evalsha(sha, 4, *_keys("x", i), 1, 100, 1, 1, HEAD, "e", channel, BODY, "", "", 0)

    return call


def _refresh(client: redis.Redis, *, full: bool) -> Call:
    """A pod's presence refresh of ``REFRESH_ROOMS`` rooms in one call, each
    room with members on that pod and on another one."""
    update = client.script_load(PRESENCE_UPDATE.source)
    keys: list[str] = []
    args: list[object] = ["pod-a", 15_000, HEAD, int(full)]
    for room in range(REFRESH_ROOMS):
        pods, base, channel = f"{{p{room}}}:pods", f"{{p{room}}}:presence:", f"ch{room}"
        for pod in ("pod-a", "pod-b"):
            joins = [f"{pod}-u1", "Ann", 1, f"{pod}-u2", "Bob", 2]
            client.evalsha(update, 1, pods, base, pod, 15_000, channel, HEAD, room, 2, *joins)
        keys.append(pods)
        args += [base, channel, room]
    sha = client.script_load(PRESENCE_REFRESH.source)

    def call(i: int) -> None:
        client.evalsha(sha, len(keys), *keys, *args)

    return call


def _measure(client: redis.Redis, call: Call, count: int, rate: float) -> float:
    """Redis's microseconds per call of ``call`` (its commandstats)."""
    client.config_resetstat()
    start = time.perf_counter()
    for i in range(count):
        call(i)
        if rate:
            due = start + (i + 1) / rate
            while (left := due - time.perf_counter()) > 0:
                time.sleep(left)
    stats = client.info("commandstats")
    if call.__name__ == "publish":
        names = ("cmdstat_publish",)
    elif call.__name__ == "plain":
        names = ("cmdstat_xadd", "cmdstat_publish")
    else:
        names = ("cmdstat_evalsha",)
    return sum(float(stats[n]["usec"]) for n in names if n in stats) / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scriptcost", description=__doc__)
    parser.add_argument("--against", type=Path, help="another append.lua to measure beside")
    parser.add_argument(
        "--layout",
        choices=("streams", "counters", "offset"),
        default="counters",
        help="the --against script's arguments: streams (this version), counters "
        "(o:<epoch> counters, 21442ef-5fa679e), offset (before 21442ef)",
    )
    parser.add_argument("--batch", type=int, default=1, help="messages per append call")
    parser.add_argument("--calls", type=int, default=3000, help="calls per paced measurement")
    parser.add_argument(
        "--fill", type=int, default=110, help="appends per room first (110: full histories)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as logdir:
        server = start_redis(Path(logdir))
        try:
            client = redis.Redis(host=HOST, port=server.port)
            for _ in range(2):  # two pods, each subscribed to every room
                sub = redis.Redis(host=HOST, port=server.port).pubsub()
                sub.subscribe(*[f"ch{i}" for i in range(ROOMS)])
                threading.Thread(target=lambda s=sub: _drain(s), daemon=True).start()

            def publish(i: int) -> None:
                client.publish(f"ch{i % ROOMS}", HEAD + b"1:e\n" + BODY)

            this = client.script_load(APPEND.source)
            calls: dict[str, Call] = {
                "append.lua (this checkout)": _append(
                    client, this, "a", layout="streams", batch=args.batch
                )
            }
            if args.against:
                sha = client.script_load(_source(args.against))
                calls[f"append.lua ({args.against})"] = _append(
                    client, sha, "b", layout=args.layout, batch=args.batch
                )
            calls["empty script, same arguments"] = _script(client, client.script_load(EMPTY))
            calls["script that only publishes"] = _script(client, client.script_load(PUBLISH_ONLY))
            calls["PUBLISH (no script)"] = publish
            calls["XADD + PUBLISH, no script"] = _plain(client, args.batch)
            for name, call in calls.items():
                if name.startswith(("append", "XADD")):
                    for i in range(ROOMS * args.fill // args.batch):  # full histories
                        call(i)
            print(f"{'µs of Redis per call':40} {'back to back':>14} {'1,000/s':>10}")
            for name, call in calls.items():
                hot = _measure(client, call, args.calls * 5, 0)
                paced = _measure(client, call, args.calls, 1000)
                line = f"{name:40} {hot:14.1f} {paced:10.1f}"
                if name.startswith(("append", "XADD")) and args.batch > 1:
                    per = args.batch
                    line += f"   per message: {hot / per:.1f} / {paced / per:.1f}"
                print(line)
            for full, what in ((True, "TTLs too"), (False, "expiry only")):
                name = f"presence refresh, {REFRESH_ROOMS} rooms, {what}"
                hot = _measure(client, _refresh(client, full=full), args.calls // 5, 0)
                print(f"{name:40} {hot:14.1f} {'-':>10}   per room: {hot / REFRESH_ROOMS:.1f}")
        finally:
            server.stop()


def _drain(sub: redis.client.PubSub) -> None:
    while True:
        sub.get_message(timeout=1.0)


if __name__ == "__main__":
    main()
