"""The wire format: decode and validate client frames, encode server frames.

Pure functions and frozen dataclasses; nothing here touches a socket.
Every frame is one JSON object in a WebSocket text frame. The full contract,
with examples, is ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .exceptions import ProtocolError

__all__ = [
    "MAX_DATA_DEPTH",
    "MAX_KEY_LENGTH",
    "MAX_REF_LENGTH",
    "MAX_TOKEN_LENGTH",
    "MESSAGE_PREFIX",
    "NO_CATCHUP",
    "ROOM_PATTERN",
    "Catchup",
    "ClientFrame",
    "CloseCode",
    "ErrorCode",
    "Identity",
    "Join",
    "Leave",
    "Message",
    "Ping",
    "PresenceQuery",
    "Refresh",
    "SendMessage",
    "check_data",
    "decode_client_frame",
    "encode_ack",
    "encode_error",
    "encode_event",
    "encode_member_event",
    "encode_presence",
    "entry_payload",
    "parse_catchup",
    "validate_room",
]

MAX_REF_LENGTH: Final = 128
MAX_KEY_LENGTH: Final = 64
MAX_DATA_DEPTH: Final = 32
"""Deepest nesting of arrays and objects in a message's ``data`` (JSON
encoders have recursion limits; a deeper ``data`` is refused, not relayed)."""
ROOM_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
"""Room names: 1-64 characters, ASCII letters, digits, ``_ . -``, starting
with a letter or digit. Safe in URLs and in Redis channel names (no glob
characters, whitespace or control characters)."""


class ErrorCode(enum.StrEnum):
    """Codes of ``error`` frames. The connection stays open after each."""

    INVALID_JSON = "invalid_json"
    INVALID_FRAME = "invalid_frame"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_DATA = "missing_data"
    INVALID_ROOM = "invalid_room"
    NOT_IN_ROOM = "not_in_room"
    TOO_MANY_ROOMS = "too_many_rooms"
    FORBIDDEN_ROOM = "forbidden_room"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    KEY_CONFLICT = "key_conflict"
    INVALID_TOKEN = "invalid_token"


class CloseCode(enum.IntEnum):
    """WebSocket close codes this service sends (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection speaks as. Set by the server, never by the client."""

    id: str
    name: str

    def as_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name}


# -- client -> server ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendMessage:
    """``{"type": "message", "data": ..., "room"?: ..., "ref"?: ..., "key"?: ...}``"""

    data: Any
    room: str | None = None
    ref: str | int | None = None
    key: str | None = None
    """Chosen by the sender, unique (random): a resend with the same key is
    not stored twice in the room (its ack says ``duplicate``)."""


@dataclass(frozen=True, slots=True)
class Catchup:
    """What a joining client already has of a room.

    ``since``: the last offset it saw (resume: it gets every later message
    still stored), with the ``epoch`` that offset belongs to; or
    ``history``: it wants the last ``history`` messages. Neither: live only.
    """

    since: int | None = None
    epoch: str | None = None
    history: int | None = None

    @property
    def asked(self) -> bool:
        """The client asked for a catch-up (and so gets a ``sync`` frame)."""
        return self.since is not None or self.history is not None


NO_CATCHUP: Final = Catchup()
MAX_EPOCH_LENGTH: Final = 64


@dataclass(frozen=True, slots=True)
class Join:
    """``{"type": "join", "room": ..., "since"?: n, "epoch"?: e, "history"?: n, "ref"?: ...}``"""

    room: str
    ref: str | int | None = None
    catchup: Catchup = NO_CATCHUP


@dataclass(frozen=True, slots=True)
class Leave:
    """``{"type": "leave", "room": ..., "ref"?: ...}``"""

    room: str
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type": "ping", "ref"?: ...}``: an application-level ping."""

    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """``{"type": "presence", "room": ..., "ref"?: ...}``: who is in the room."""

    room: str
    ref: str | int | None = None


@dataclass(frozen=True, slots=True)
class Refresh:
    """``{"type": "refresh", "token": ..., "ref"?: ...}``: the connection's
    new credential, before the old one expires."""

    token: str
    ref: str | int | None = None


MAX_TOKEN_LENGTH: Final = 8192

ClientFrame = SendMessage | Join | Leave | Ping | PresenceQuery | Refresh


def _offset(value: object, name: str, ref: str | int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 53:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"{name!r} must be a non-negative integer", ref=ref
        )
    return value


def parse_catchup(
    since: object, epoch: object, history: object, *, ref: str | int | None = None
) -> Catchup:
    """Validate the catch-up fields of a join frame or query string
    (already converted to int where they came as text)."""
    offset = _offset(since, "since", ref)
    count = _offset(history, "history", ref)
    if epoch is not None and (not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_LENGTH):
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, "'epoch' must be the string from a message frame", ref=ref
        )
    if offset is not None and count is not None:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, "give 'since' (resume) or 'history', not both", ref=ref
        )
    if offset is None and count is None:
        return NO_CATCHUP
    return Catchup(since=offset, epoch=epoch, history=count)


def validate_room(room: object, *, ref: str | int | None = None) -> str:
    """Return ``room`` if it is a valid room name, else raise ``ProtocolError``."""
    if not isinstance(room, str) or ROOM_PATTERN.fullmatch(room) is None:
        raise ProtocolError(
            ErrorCode.INVALID_ROOM,
            "room names are 1-64 characters: letters, digits, '_', '.', '-'",
            ref=ref,
        )
    return room


def _read_ref(frame: dict[str, Any]) -> str | int | None:
    ref = frame.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, str | int):
        raise ProtocolError(ErrorCode.INVALID_FRAME, "'ref' must be a string or an integer")
    if isinstance(ref, str) and len(ref) > MAX_REF_LENGTH:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"'ref' is longer than {MAX_REF_LENGTH} characters"
        )
    return ref


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _read_key(frame: dict[str, Any], ref: str | int | None) -> str | None:
    key = frame.get("key")
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH or _CONTROL.search(key):
        raise ProtocolError(
            ErrorCode.INVALID_FRAME,
            f"'key' must be a string of 1-{MAX_KEY_LENGTH} characters (no control characters)",
            ref=ref,
        )
    return key


_OPENERS: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays/objects in ``value`` (as ``orjson.loads`` made it)
    nest more than ``limit`` deep.

    Works on the JSON text with bytes methods (a tree walk in Python costs
    about 1 µs per container): strings cut out (escaped backslashes and
    quotes first, so every quote left delimits a string), every bracket
    made ``[``/``]``, then each pass deletes the innermost pairs; whatever is
    left after ``limit`` passes nests deeper."""
    if not isinstance(value, dict | list):
        return False
    try:
        text = orjson.dumps(value)
    except TypeError:  # orjson's own recursion limit
        return True
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    unquoted = text.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2]
    skeleton = b"".join(unquoted).translate(_OPENERS, _NOT_BRACKETS)
    for _ in range(limit):
        skeleton = skeleton.replace(b"[]", b"")
        if not skeleton:
            return False
    return True


def check_data(data: Any, *, ref: str | int | None = None) -> None:
    """Raise ``ProtocolError`` unless ``data`` (a message's, from a frame or
    the HTTP API alike) may be relayed: nested at most ``MAX_DATA_DEPTH``."""
    if _nested_deeper_than(data, MAX_DATA_DEPTH):
        raise ProtocolError(
            ErrorCode.INVALID_FRAME,
            f"'data' is nested deeper than {MAX_DATA_DEPTH} levels",
            ref=ref,
        )


def decode_client_frame(raw: str | bytes) -> ClientFrame:
    """Decode one client text frame into a typed frame.

    Raises ``ProtocolError`` with the code to answer with; its ``ref`` is set
    whenever the frame was readable enough to carry one.
    """
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {exc}") from exc
    if not isinstance(frame, dict):
        raise ProtocolError(ErrorCode.INVALID_FRAME, "a frame must be a JSON object")
    ref = _read_ref(frame)
    kind = frame.get("type")
    if kind == "message":
        if "data" not in frame:
            raise ProtocolError(ErrorCode.MISSING_DATA, "a message needs a 'data' field", ref=ref)
        check_data(frame["data"], ref=ref)
        room = frame.get("room")
        return SendMessage(
            data=frame["data"],
            room=None if room is None else validate_room(room, ref=ref),
            ref=ref,
            key=_read_key(frame, ref),
        )
    if kind == "join":
        return Join(
            room=validate_room(frame.get("room"), ref=ref),
            ref=ref,
            catchup=parse_catchup(
                frame.get("since"), frame.get("epoch"), frame.get("history"), ref=ref
            ),
        )
    if kind == "presence":
        return PresenceQuery(room=validate_room(frame.get("room"), ref=ref), ref=ref)
    if kind == "leave":
        return Leave(room=validate_room(frame.get("room"), ref=ref), ref=ref)
    if kind == "ping":
        return Ping(ref=ref)
    if kind == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise ProtocolError(
                ErrorCode.INVALID_FRAME,
                f"'token' must be a string of 1-{MAX_TOKEN_LENGTH} characters",
                ref=ref,
            )
        return Refresh(token=token, ref=ref)
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_FRAME, "a frame needs a string 'type'", ref=ref)
    shown = kind if len(kind) <= 32 else kind[:32] + "..."
    raise ProtocolError(
        ErrorCode.UNKNOWN_TYPE,
        f"unknown frame type {shown!r}; expected message, join, leave, ping, presence or refresh",
        ref=ref,
    )


# -- server -> client ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A chat message as the server stamped it. ``room`` is None for global."""

    id: str
    room: str | None
    sender: Identity
    ts: int
    data: Any
    digest: str | None = None
    """What identifies the message under a key, when ``data`` is not what
    the sender sent (a publish screen replaced it): the ``data_digest`` of
    the sent data. None: that of ``data``."""

    def encode(self) -> bytes:
        """The client-facing JSON of this message, built once per broadcast.

        Room messages are sent with their ``offset`` and ``epoch``
        (``entry_payload``); this form, without them, is for global messages
        and for room messages that could not be stored (link down)."""
        return orjson.dumps(
            {
                "type": "message",
                "room": self.room,
                "id": self.id,
                "from": self.sender.as_json(),
                "ts": self.ts,
                "data": self.data,
            }
        )

    def body(self) -> bytes:
        """``encode()`` without its leading ``{"type":"message",``: what a
        backend stores and carries; ``entry_payload`` makes it a frame."""
        return self.encode()[len(MESSAGE_PREFIX) :]


MESSAGE_PREFIX: Final = b'{"type":"message",'


def entry_payload(body: bytes, epoch: str, offset: int) -> bytes:
    """A room message's frame as clients get it, with its room ``offset``
    and ``epoch``: ``{"type":"message","offset":N,"epoch":"E",`` + ``body``.

    The one place this frame is built: live or replayed from history, on the
    sending pod or another, a message's bytes are the same. ``epoch`` is hex,
    never needing escapes."""
    return b'%s"offset":%d,"epoch":"%s",%s' % (MESSAGE_PREFIX, offset, epoch.encode(), body)


def encode_event(kind: str, **fields: Any) -> bytes:
    """Encode a server frame of type ``kind`` with the given fields."""
    return orjson.dumps({"type": kind, **fields})


def encode_ack(
    ref: str | int,
    message_id: str,
    room: str | None,
    *,
    epoch: str | None = None,
    offset: int | None = None,
    duplicate: bool = False,
    replicated: bool = True,
) -> bytes:
    """``ack``; for room messages also the ``offset`` and ``epoch`` the
    message got (both null if it could not be stored), ``duplicate`` when
    its key was stored already (the offset and epoch are the stored
    message's), and ``replicated: false`` when too few Redis replicas
    confirmed it in time (a failover may lose it)."""
    frame: dict[str, Any] = {"type": "ack", "ref": ref, "id": message_id, "room": room}
    if room is not None:
        frame["offset"] = offset
        frame["epoch"] = epoch
        if duplicate:
            frame["duplicate"] = True
        if not replicated:
            frame["replicated"] = False
    return orjson.dumps(frame)


def encode_member_event(kind: str, room: str, user_id: str, name: str, ts: int) -> bytes:
    """``member_joined`` / ``member_left``."""
    return orjson.dumps(
        {"type": kind, "room": room, "user": {"id": user_id, "name": name}, "ts": ts}
    )


def encode_presence(
    room: str, members: list[dict[str, Any]], ref: str | int | None = None
) -> bytes:
    """``presence``: a room's member list (each ``{"id", "name", "since"}``)."""
    frame: dict[str, Any] = {"type": "presence", "room": room, "members": members}
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame)


def encode_error(code: str, message: str, ref: str | int | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame)
