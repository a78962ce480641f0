"""``chat-api chat URL``: chat from a terminal, on top of :class:`Client`.

Prints each message as ``[room] name: text`` on stdout; reads lines from
stdin and sends each as ``{"text": line}`` to the current room (the URL's,
or the last one joined); ``/join ROOM``, ``/leave ROOM``, ``/room ROOM``,
``/who``, ``/quit``. What is not a message (joins and leaves, reconnects,
what could not be recovered, errors) goes to stderr, prefixed ``--``.
Exit status: 0 after ``/quit`` or the end of stdin, 1 when the connection is
refused or closed for good, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import orjson
from yarl import URL

from .client import Client, TokenSource
from .errors import ClientClosed, ClientError, ConnectError, JoinError, Refused, SendError
from .events import (
    Closed,
    Disconnected,
    EpochChanged,
    Event,
    Left,
    MemberJoined,
    MemberLeft,
    Message,
    Presence,
    Reconnected,
    ServerError,
    Unrecoverable,
)

__all__ = ["main"]

PROG = "chat-api chat"
API_WS = "/api/chat-api/ws"
DRAIN_TIMEOUT = 10.0
"""Seconds to wait at /quit or end of input for sends not acknowledged yet."""
HELP = "commands: /join ROOM, /leave ROOM, /room ROOM (send there), /who, /quit"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Chat from a terminal: prints '[room] name: text' lines, sends each line "
        f"you type. {HELP}. Reconnects and resumes by itself.",
    )
    parser.add_argument(
        "url",
        help="ws://HOST:PORT/api/chat-api/ws/ROOM (short forms: ws://HOST:PORT/ROOM, "
        "ws://HOST:PORT/ws/ROOM; ws://HOST:PORT/api/chat-api/ws for no room)",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="a JWT (AUTH_ENABLED=true)")
    tokens.add_argument(
        "--token-command",
        metavar="CMD",
        help="a command printing a fresh JWT, run at every (re)connect and before the token "
        "expires (e.g. 'chat-api token --sub ada --ttl 600')",
    )
    parser.add_argument("--name", help="display name (pods without auth)")
    parser.add_argument(
        "--history",
        type=int,
        default=20,
        metavar="N",
        help="recent messages to show on entering a room (default 20)",
    )
    return parser


def expand_url(url: str) -> str:
    """The full WebSocket URL for a short form: an ``http(s)://`` scheme
    becomes ``ws(s)://``; no path, ``/ROOM`` or ``/ws/ROOM`` gets the
    service's ``/api/chat-api/ws`` prefix. Longer paths are kept as given."""
    parsed = URL(url)
    scheme = {"http": "ws", "https": "wss"}.get(parsed.scheme, parsed.scheme)
    parts = [p for p in parsed.path.split("/") if p]
    if parts and parts[0] == "ws" and len(parts) <= 2:
        parts = parts[1:]
    if len(parts) <= 1 and parts != ["ws"]:
        path = API_WS + ("/" + parts[0] if parts else "")
        parsed = parsed.with_path(path).with_query(parsed.query)
    return str(parsed.with_scheme(scheme))


def command_token(command: str) -> Callable[[], Awaitable[str]]:
    """A token source that runs ``command`` and reads the token it prints."""
    args = shlex.split(command)
    if not args:
        raise ValueError("--token-command is empty")

    async def fetch() -> str:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"--token-command exited with {proc.returncode}: {err.decode().strip()}"
            )
        token = out.decode().strip()
        if not token:
            raise RuntimeError("--token-command printed no token")
        return token

    return fetch


def render(event: Event) -> tuple[str, bool] | None:
    """``(line, is_message)`` to print for ``event`` (None: nothing)."""
    match event:
        case Message(room=room, sender=sender, data=data, to=to):
            where = room if room is not None else ("to you" if to is not None else "everyone")
            return f"[{where}] {sender.name}: {_text(data)}", True
        case MemberJoined(room=room, user=user):
            return f"[{room}] {user.name} joined", False
        case MemberLeft(room=room, user=user):
            return f"[{room}] {user.name} left", False
        case Presence(room=room, members=members):
            names = ", ".join(m.name for m in members) or "nobody"
            return f"[{room}] here: {names}", False
        case Left(room=room, reason=reason):
            return f"[{room}] left" + (f" ({reason})" if reason else ""), False
        case EpochChanged(room=room):
            return f"[{room}] the room's history was reset", False
        case Unrecoverable(room=room, reason=reason, lost=lost):
            what = f"{lost} message(s)" if lost else "messages"
            return f"[{room}] {what} could not be recovered ({reason})", False
        case ServerError(code=code, message=message):
            return f"error: {code}: {message}", False
        case Disconnected(code=code, reason=reason, reconnect_in=delay):
            again = f"; reconnecting in {delay:.1f} s" if delay is not None else ""
            return f"disconnected ({code} {reason}".rstrip() + f"){again}", False
        case Reconnected(url=url, pod=pod):
            return f"reconnected to {url} (pod {pod})", False
        case Closed(error=error) if error is not None:
            return f"closed: {error}", False
    return None


def _text(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        return str(data["text"])
    return orjson.dumps(data).decode()


def _read_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    """A daemon thread's loop: stdin lines into ``queue``, None at its end
    (a thread, not the loop's pipe reader: stdin may be a terminal, a pipe
    or a file, and a daemon never holds the exit up)."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\r\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


class _Session:
    def __init__(self, client: Client, room: str | None, out: TextIO, err: TextIO) -> None:
        self.client = client
        self.room = room
        self.out = out
        self.err = err
        self.sends: set[asyncio.Task[None]] = set()

    def say(self, line: str) -> None:
        print(f"-- {line}", file=self.err, flush=True)

    async def show(self) -> Closed | None:
        closed: Closed | None = None
        async for event in self.client:
            shown = render(event)
            if isinstance(event, Closed):
                closed = event
            if shown is None:
                continue
            line, is_message = shown
            if is_message:
                print(line, file=self.out, flush=True)
            else:
                self.say(line)
        return closed

    async def command(self, line: str) -> bool:
        """Act on one input line; False at /quit."""
        word, _, rest = line.partition(" ")
        arg = rest.strip()
        if word == "/quit":
            return False
        if word == "/join" and arg:
            try:
                await self.client.join(arg, history=0)
            except JoinError as exc:
                self.say(f"cannot join {arg}: {exc}")
            else:
                self.room = arg
                self.say(f"joined {arg}; what you type goes there")
        elif word == "/leave" and arg:
            await self.client.leave(arg)
            if self.room == arg:
                self.room = next(iter(self.client.rooms), None)
        elif word == "/room" and arg in self.client.rooms:
            self.room = arg
        elif word == "/who" and self.room is not None:
            try:
                presence = await self.client.presence(self.room)
            except ClientError as exc:
                self.say(f"cannot list {self.room}: {exc}")
            else:
                self.say(", ".join(m.name for m in presence.members) or "nobody")
        else:
            self.say(HELP)
        return True

    def send(self, text: str) -> None:
        task = asyncio.get_running_loop().create_task(self._send(self.room, text))
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    async def _send(self, room: str | None, text: str) -> None:
        try:
            await self.client.send(room, {"text": text})
        except SendError as exc:
            self.say(f"not sent ({exc.code}): {text}")
        except ClientClosed:
            self.say(f"not sent (closed): {text}")

    async def drain(self) -> None:
        """Wait (a while) for what was sent to be acknowledged."""
        if not self.sends:
            return
        _, pending = await asyncio.wait(set(self.sends), timeout=DRAIN_TIMEOUT)
        for task in pending:
            task.cancel()
        if pending:
            self.say(f"{len(pending)} message(s) not confirmed by the server")


async def _chat(options: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    url = expand_url(options.url)
    token: TokenSource = options.token
    if options.token_command:
        token = command_token(options.token_command)
    try:
        client = Client(url, token=token, name=options.name, history=max(0, options.history))
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=err)
        return 2
    try:
        await client.connect()
    except Refused as exc:
        hint = ""
        if exc.status == 404:
            hint = f" (is this a chat-api pod? its WebSocket path is {API_WS}/ROOM)"
        print(f"{PROG}: the server refused the connection: {exc}{hint}", file=err)
        return 1
    except ConnectError as exc:
        print(f"{PROG}: {exc}", file=err)
        return 1
    session = _Session(client, next(iter(client.rooms), None), out, err)
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(
        target=_read_lines, args=(asyncio.get_running_loop(), lines), daemon=True
    ).start()
    shower = asyncio.get_running_loop().create_task(session.show())
    closed: Closed | None = None
    session.say(f"connected to {url}; {HELP}")
    try:
        while True:
            getter = asyncio.ensure_future(lines.get())
            done, _ = await asyncio.wait({getter, shower}, return_when=asyncio.FIRST_COMPLETED)
            if shower in done:
                getter.cancel()
                break  # closed for good: the reason was printed
            line = getter.result()
            if line is None:
                break
            if line.startswith("/"):
                if not await session.command(line):
                    break
            elif line.strip():
                if session.room is None and client.rooms:
                    session.room = client.rooms[0]
                session.send(line)
        if not shower.done():
            await session.drain()
    finally:
        await client.close()
        with contextlib.suppress(asyncio.CancelledError):
            closed = await shower
    if closed is not None and closed.error is not None:
        return 1
    return 0


def main(argv: list[str]) -> int:
    """``chat-api chat …``; returns the exit status."""
    options = _parser().parse_args(argv)
    if options.history < 0:
        print(f"{PROG}: --history must be 0 or more", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_chat(options, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        return 0
