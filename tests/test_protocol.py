"""The wire format, without sockets."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.core.exceptions import ProtocolError
from realtime.core.protocol import (
    ErrorCode,
    Identity,
    Join,
    Leave,
    Message,
    Ping,
    SendMessage,
    decode_client_frame,
    encode_ack,
    encode_error,
    validate_room,
)


def test_message_frame_with_room_and_ref() -> None:
    frame = decode_client_frame('{"type":"message","data":{"text":"hi"},"room":"general","ref":7}')
    assert frame == SendMessage(data={"text": "hi"}, room="general", ref=7)


@pytest.mark.parametrize("data", [None, 0, "x", [1, 2], {"nested": {"a": [True, 1.5]}}])
def test_any_json_data_is_accepted(data: object) -> None:
    frame = decode_client_frame(orjson.dumps({"type": "message", "data": data}))
    assert isinstance(frame, SendMessage)
    assert frame.data == data


def test_join_leave_ping() -> None:
    assert decode_client_frame('{"type":"join","room":"a"}') == Join("a")
    assert decode_client_frame('{"type":"leave","room":"a","ref":"x"}') == Leave("a", "x")
    assert decode_client_frame('{"type":"ping"}') == Ping()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", ErrorCode.INVALID_JSON),
        ("[" * 2000 + "]" * 2000, ErrorCode.INVALID_JSON),
        ("[1,2]", ErrorCode.INVALID_FRAME),
        ('"message"', ErrorCode.INVALID_FRAME),
        ('{"data":1}', ErrorCode.INVALID_FRAME),
        ('{"type":5}', ErrorCode.INVALID_FRAME),
        ('{"type":"message","data":1,"ref":[1]}', ErrorCode.INVALID_FRAME),
        ('{"type":"message","data":1,"ref":true}', ErrorCode.INVALID_FRAME),
        ('{"type":"message","data":1,"ref":"' + "x" * 200 + '"}', ErrorCode.INVALID_FRAME),
        ('{"type":"shout","data":1}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"message"}', ErrorCode.MISSING_DATA),
        ('{"type":"message","data":1,"room":"a b"}', ErrorCode.INVALID_ROOM),
        ('{"type":"join"}', ErrorCode.INVALID_ROOM),
        ('{"type":"join","room":"x*"}', ErrorCode.INVALID_ROOM),
    ],
)
def test_bad_frames_raise_with_their_code(raw: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(raw)
    assert info.value.code == code
    assert info.value.message


def test_error_keeps_the_ref_when_readable() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame('{"type":"message","ref":"r1"}')
    assert info.value.ref == "r1"


def test_unknown_type_is_shown_shortened() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(orjson.dumps({"type": "x" * 1000}))
    assert len(info.value.message) < 200


@pytest.mark.parametrize("room", ["general", "a", "A-1_b.c", "9" * 64])
def test_valid_rooms(room: str) -> None:
    assert validate_room(room) == room


@pytest.mark.parametrize(
    "room", ["", "-a", "a" * 65, "a b", "a*", "a?", "a[b]", "a\nb", "é", "a/b", 5, None]
)
def test_invalid_rooms(room: object) -> None:
    with pytest.raises(ProtocolError):
        validate_room(room)


def test_message_encodes_every_field() -> None:
    msg = Message(id="m1", room="r", sender=Identity("u1", "Ada"), ts=1234, data={"t": "hi"})
    assert orjson.loads(msg.encode()) == {
        "type": "message",
        "room": "r",
        "id": "m1",
        "from": {"id": "u1", "name": "Ada"},
        "ts": 1234,
        "data": {"t": "hi"},
    }


def test_ack_and_error_frames() -> None:
    assert orjson.loads(encode_ack(1, "m1", None)) == {
        "type": "ack",
        "ref": 1,
        "id": "m1",
        "room": None,
    }
    assert "ref" not in orjson.loads(encode_error("invalid_json", "bad"))


def test_data_nesting_is_limited_below_the_encoders_recursion_limit() -> None:
    from realtime.core.protocol import MAX_DATA_DEPTH

    ok = "[" * MAX_DATA_DEPTH + "]" * MAX_DATA_DEPTH
    frame = decode_client_frame('{"type": "message", "data": ' + ok + "}")
    assert isinstance(frame, SendMessage)
    Message("1", None, Identity("u", "u"), 0, frame.data).encode()  # encodable
    deep = '{"a": ' * MAX_DATA_DEPTH + "[]" + "}" * MAX_DATA_DEPTH
    with pytest.raises(ProtocolError) as info:
        decode_client_frame('{"type": "message", "data": ' + deep + ', "ref": 5}')
    assert (info.value.code, info.value.ref) == (ErrorCode.INVALID_FRAME, 5)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


_tricky_text = st.text(alphabet='ab[]{}"\\\n', max_size=8)


@settings(max_examples=500)
@given(
    value=st.recursive(
        st.none() | st.integers(-(2**63), 2**64 - 1) | _tricky_text,  # as orjson decodes
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(_tricky_text, inner, max_size=3)
        ),
        max_leaves=60,
    ),
    limit=st.integers(1, 40),
)
def test_nesting_check_agrees_with_a_tree_walk(value: object, limit: int) -> None:
    from realtime.core.protocol import _nested_deeper_than

    assert _nested_deeper_than(value, limit) is (_depth(value) > limit)
