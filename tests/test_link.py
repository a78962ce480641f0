"""The pod's RESP3 link to Redis, fed bytes directly (no socket, no Redis),
and against a real redis-server; Redis addresses from URLs."""

from __future__ import annotations

import asyncio

import hiredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.exceptions import NoScriptError, ResponseError

from realtime import BroadcastError
from realtime.backends.redis.link import Link, open_link
from realtime.backends.redis.resp import InFlightLost, RedisAddress, pack_command

from .redis_support import REDIS_SERVER, running_redis


class RecordingTransport(asyncio.Transport):
    """What the link writes, and whether it was told to go."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing or self.aborted

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.aborted = True


def push(*items: bytes | int) -> bytes:
    """A RESP3 push, as Redis sends pub/sub messages and confirmations."""
    out = [b">%d\r\n" % len(items)]
    for item in items:
        if isinstance(item, int):
            out.append(b":%d\r\n" % item)
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(item), item))
    return b"".join(out)


def connected() -> tuple[Link, RecordingTransport, list[tuple[bytes, bytes]]]:
    got: list[tuple[bytes, bytes]] = []
    link = Link(lambda channel, data: got.append((channel, data)))
    transport = RecordingTransport()
    link.connection_made(transport)
    return link, transport, got


def parse_commands(data: bytes) -> list[list[bytes]]:
    reader = hiredis.Reader()
    reader.feed(data)
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


async def test_each_batch_gets_its_own_replies_in_order_however_they_are_split() -> None:
    link, transport, got = connected()
    first = link.call(pack_command(b"PUBLISH", b"c", b"1") * 2, 2)
    second = link.call(pack_command(b"PUBLISH", b"c", b"2"), 1)
    assert parse_commands(bytes(transport.written)) == [[b"PUBLISH", b"c", b"1"]] * 2 + [
        [b"PUBLISH", b"c", b"2"]
    ]
    # A push between the replies is a message, not a reply.
    stream = b":1\r\n" + push(b"message", b"c", b"1") + b":0\r\n:5\r\n"
    for i in range(len(stream)):  # one byte at a time
        link.data_received(stream[i : i + 1])
    assert await first == [1, 0]
    assert await second == [5]
    assert got == [(b"c", b"1")]


async def test_error_replies_come_back_in_their_place() -> None:
    link, _, _ = connected()
    batch = link.call(b"", 3)
    link.data_received(b"-NOSCRIPT No matching script.\r\n:7\r\n-ERR wrong type\r\n")
    missing, ok, refused = await batch
    assert isinstance(missing, NoScriptError)
    assert ok == 7
    assert isinstance(refused, ResponseError)
    assert "wrong type" in str(refused)


async def test_a_lost_connection_fails_every_batch_in_flight() -> None:
    link, _, _ = connected()
    first, second = link.call(b"", 1), link.call(b"", 2)
    link.data_received(b":1\r\n" + push(b"subscribe", b"c", 1))
    assert link.channels == {b"c"}
    link.connection_lost(ConnectionResetError("reset by peer"))
    assert await first == [1]
    with pytest.raises(InFlightLost, match="reset by peer"):
        await second
    assert not link.open
    assert link.closed.done()
    assert link.channels == set()
    with pytest.raises(ConnectionError):
        await link.call(b"", 1)  # nothing is written to a closed connection


async def test_junk_or_an_unasked_reply_drops_the_connection() -> None:
    link, transport, _ = connected()
    link.data_received(b":1\r\n")
    assert transport.aborted

    link, transport, _ = connected()
    link.call(b"", 1)
    link.data_received(b"?junk\r\n")
    assert transport.aborted
    assert "unreadable" in link.lost_reason


async def test_subscriptions_are_confirmed_by_pushes_and_batched() -> None:
    link, transport, _ = connected()
    link.subscribe([b"c%d" % n for n in range(1200)])
    commands = parse_commands(bytes(transport.written))
    assert [len(c) - 1 for c in commands] == [512, 512, 176]
    assert all(c[0] == b"SUBSCRIBE" for c in commands)
    link.data_received(push(b"subscribe", b"a", 1) + push(b"subscribe", b"b", 2))
    link.unsubscribe([b"a"])
    link.data_received(push(b"unsubscribe", b"a", 1))
    assert link.channels == {b"b"}


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50),
)
def test_messages_cut_anywhere_arrive_whole_and_in_order(
    payloads: list[bytes], cuts: list[int]
) -> None:
    async def run() -> list[tuple[bytes, bytes]]:
        link, _, got = connected()
        stream = b"".join(push(b"message", b"room:%d" % i, p) for i, p in enumerate(payloads))
        position, n = 0, 0
        while position < len(stream):
            step = cuts[n % len(cuts)]
            link.data_received(stream[position : position + step])
            position += step
            n += 1
        return got

    got = asyncio.run(run())
    assert got == [(b"room:%d" % i, p) for i, p in enumerate(payloads)]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
async def test_against_redis_with_a_password_and_a_database() -> None:
    with running_redis(password="s3cret") as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        got: list[tuple[bytes, bytes]] = []
        link = await open_link(
            RedisAddress.from_url(url),
            lambda channel, data: got.append((channel, data)),
            client_name="t:link",
            timeout=5,
        )
        link.subscribe([b"c"])
        replies = await link.call(
            pack_command(b"SET", b"k", b"v")
            + pack_command(b"CLIENT", b"GETNAME")
            + pack_command(b"PUBLISH", b"c", b"hi"),
            3,
        )
        assert replies == [b"OK", b"t:link", 1]  # one subscriber: this very link
        assert server.client().get("k") is None  # database 0 is untouched
        db3 = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret", db=3)
        assert db3.get("k") == b"v"
        db3.close()
        assert got == [(b"c", b"hi")]  # the push came on the same connection
        assert link.channels == {b"c"}
        link.abort()

        wrong = RedisAddress.from_url(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(BroadcastError, match="refused"):
            await open_link(wrong, lambda c, d: None, client_name="t:link", timeout=5)


def test_pack_command_is_what_redis_reads() -> None:
    args = [b"PUBLISH", b"p:room:x", b'pod-a\n{"a": "\\r\\n"}']
    assert parse_commands(pack_command(*args)) == [args]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6380/2", RedisAddress(host="localhost", port=6380, db=2)),
        (
            "redis://user:p%40ss@10.0.0.1:7000/0",
            RedisAddress(host="10.0.0.1", port=7000, username="user", password="p@ss"),
        ),
        (
            "unix:///tmp/redis.sock?password=pw&db=1",
            RedisAddress(path="/tmp/redis.sock", password="pw", db=1),
        ),
        ("rediss://:pw@cache.example", RedisAddress(host="cache.example", password="pw", tls=True)),
        (
            "rediss://cache.example?ssl_cert_reqs=none",
            RedisAddress(host="cache.example", tls=True, tls_verify=False),
        ),
    ],
)
def test_addresses_from_urls(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.from_url(url) == expected


def test_a_tls_address_makes_a_tls_context() -> None:
    assert RedisAddress.from_url("redis://h").ssl_context() is None
    context = RedisAddress.from_url("rediss://h?ssl_cert_reqs=none").ssl_context()
    assert context is not None
    assert not context.check_hostname
