"""The publishing connection, fed bytes directly; and against a real Redis."""

from __future__ import annotations

import pytest
import redis
from redis.exceptions import NoScriptError, ResponseError

from realtime import BroadcastError
from realtime.backends.redis.pipe import CommandPipe, open_pipe
from realtime.backends.redis.resp import RedisAddress, pack_command

from .redis_support import REDIS_SERVER, running_redis
from .test_subscriber import RecordingTransport, parse_commands


def connected() -> tuple[CommandPipe, RecordingTransport]:
    pipe = CommandPipe()
    transport = RecordingTransport()
    pipe.connection_made(transport)
    return pipe, transport


async def test_each_batch_gets_its_own_replies_in_order_however_they_are_split() -> None:
    pipe, transport = connected()
    first = pipe.call(pack_command(b"PUBLISH", b"c", b"1") * 2, 2)
    second = pipe.call(pack_command(b"PUBLISH", b"c", b"2"), 1)
    assert parse_commands(bytes(transport.written)) == [[b"PUBLISH", b"c", b"1"]] * 2 + [
        [b"PUBLISH", b"c", b"2"]
    ]
    replies = b":1\r\n:0\r\n:5\r\n"
    for i in range(len(replies)):  # one byte at a time
        pipe.data_received(replies[i : i + 1])
        if i == 3:
            assert not first.done()
    assert await first == [1, 0]
    assert await second == [5]


async def test_error_replies_come_back_in_their_place() -> None:
    pipe, _ = connected()
    batch = pipe.call(b"", 3)
    pipe.data_received(b"-NOSCRIPT No matching script.\r\n:7\r\n-ERR wrong type\r\n")
    missing, ok, refused = await batch
    assert isinstance(missing, NoScriptError)
    assert ok == 7
    assert isinstance(refused, ResponseError)
    assert "wrong type" in str(refused)


async def test_a_lost_connection_fails_every_batch_in_flight() -> None:
    pipe, _ = connected()
    first, second = pipe.call(b"", 1), pipe.call(b"", 2)
    pipe.data_received(b":1\r\n")
    pipe.connection_lost(ConnectionResetError("reset"))
    assert await first == [1]
    with pytest.raises(ConnectionError, match="reset"):
        await second
    assert not pipe.open
    with pytest.raises(ConnectionError):
        await pipe.call(b"", 1)  # nothing is written to a closed connection


async def test_junk_or_an_unasked_reply_drops_the_connection() -> None:
    pipe, transport = connected()
    pipe.data_received(b":1\r\n")
    assert transport.aborted

    pipe, transport = connected()
    pipe.call(b"", 1)
    pipe.data_received(b"?junk\r\n")
    assert transport.aborted
    assert "unreadable" in pipe.lost_reason


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on PATH")
async def test_against_redis_with_a_password_and_a_database() -> None:
    with running_redis(password="s3cret") as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        pipe = await open_pipe(RedisAddress.from_url(url), client_name="t:pub", timeout=5)
        replies = await pipe.call(
            pack_command(b"SET", b"k", b"v") + pack_command(b"CLIENT", b"GETNAME"), 2
        )
        assert replies == [b"OK", b"t:pub"]
        assert server.client().get("k") is None  # database 0 is untouched
        db3 = redis.Redis(host="127.0.0.1", port=server.port, password="s3cret", db=3)
        assert db3.get("k") == b"v"
        db3.close()
        pipe.abort()

        wrong = RedisAddress.from_url(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(BroadcastError, match="refused"):
            await open_pipe(wrong, client_name="t:pub", timeout=5)
