"""``chat-api`` and ``python -m chat_api``: run one pod, and a few tools.

``chat-api`` with no arguments serves (as ``chat-api serve`` does); ``chat-api
token`` signs a token for testing with the pod's own settings; ``chat-api
chat`` is the terminal client (``chat_api.client.cli``). Every command reads
its settings as a pod does: the environment over ``.env``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .config import Config, ConfigError

__all__ = ["main"]

PROG = "chat-api"
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")


def _version() -> str:
    try:
        return importlib.metadata.version("chat-api")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A horizontally scalable WebSocket chat service. With no command, "
        "serves (like 'chat-api serve'). Settings come from the environment and .env "
        "(see .env.example).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="run one pod (the default)",
        description="Run one pod until SIGTERM or SIGINT (settings: environment and .env).",
    )
    token = commands.add_parser(
        "token",
        help="print a signed JWT for testing (HS256/384/512 with AUTH_JWT_SECRET)",
        description="Sign a token with AUTH_JWT_SECRET and the configured audience, issuer "
        "and claim names (AUTH_AUDIENCE, AUTH_ISSUER, AUTH_NAME_CLAIM, AUTH_ROOMS_CLAIM, "
        "AUTH_ADMIN_CLAIM), read like a pod reads them (environment, then .env). "
        "Prints only the token.",
    )
    token.add_argument("--sub", required=True, help="the user id (the sub claim)")
    token.add_argument("--name", help="the display name (AUTH_NAME_CLAIM)")
    token.add_argument(
        "--rooms",
        help="comma-separated rooms or * patterns it may join (AUTH_ROOMS_CLAIM; "
        "default: no claim, every room)",
    )
    token.add_argument(
        "--admin",
        action="store_true",
        help="may read the stats, presence and metrics (AUTH_ADMIN_CLAIM)",
    )
    token.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)"
    )
    token.add_argument(
        "--algorithm",
        choices=HMAC_ALGORITHMS,
        help="default: the first HMAC algorithm of AUTH_JWT_ALGORITHMS, else HS256",
    )
    commands.add_parser(
        "chat",
        help="the terminal chat client (chat-api chat --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "chat":
        # Everything after "chat" is the client's, --help included.
        raise SystemExit(_chat(args[1:]))
    options = _parser().parse_args(args)
    if options.command == "token":
        raise SystemExit(_token(options))
    _serve()


def _load_config(command: str) -> Config:
    try:
        return Config.load()
    except ConfigError as exc:
        print(f"{command}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve() -> None:
    import uvloop

    from . import logs
    from .app import serve

    config = _load_config(PROG)
    logs.configure(
        config.log_level_number,
        config.log_format,
        pod_id=config.pod_id,
        secrets=config.secrets,
    )
    try:
        # uvloop: the same asyncio API with a faster loop and transports
        # (about 15 % less CPU per message in the small-rooms benchmark).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"{PROG}: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _token(options: argparse.Namespace) -> int:
    import jwt

    command = f"{PROG} token"
    config = _load_config(command)
    secret = config.auth_jwt_secret
    if not secret:
        other = (
            " (this configuration verifies tokens with a public key: sign them with its "
            "private key instead)"
            if config.auth_jwt_public_key or config.auth_jwks_url
            else ""
        )
        print(
            f"{command}: AUTH_JWT_SECRET is not set{other}; set it in the environment or in "
            ".env (at least 32 bytes: openssl rand -base64 48)",
            file=sys.stderr,
        )
        return 2
    algorithm = options.algorithm or next(
        (a for a in config.auth_jwt_algorithms if a in HMAC_ALGORITHMS), "HS256"
    )
    needed = int(algorithm[2:]) // 8
    if len(secret.encode()) < needed:
        print(
            f"{command}: AUTH_JWT_SECRET must be at least {needed} bytes long for {algorithm}",
            file=sys.stderr,
        )
        return 2
    if not options.sub.strip():
        print(f"{command}: --sub must not be empty", file=sys.stderr)
        return 2
    if options.ttl <= 0:
        print(f"{command}: --ttl must be more than 0 seconds", file=sys.stderr)
        return 2
    now = int(time.time())
    claims: dict[str, Any] = {"sub": options.sub, "iat": now, "exp": now + int(options.ttl)}
    if options.name:
        claims[config.auth_name_claim] = options.name
    if options.rooms is not None:
        claims[config.auth_rooms_claim] = [r.strip() for r in options.rooms.split(",") if r.strip()]
    if options.admin:
        claims[config.auth_admin_claim] = True
    if config.auth_audience:
        claims["aud"] = config.auth_audience
    if config.auth_issuer:
        claims["iss"] = config.auth_issuer
    print(jwt.encode(claims, secret, algorithm=algorithm))
    return 0


def _chat(argv: list[str]) -> int:
    try:
        module = importlib.import_module("chat_api.client.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("chat_api.client", "chat_api.client.cli"):
            raise  # the client is there, and something it needs is not
        print(
            f"{PROG} chat: the terminal client is not available in this build "
            "(chat_api.client.cli is missing)",
            file=sys.stderr,
        )
        return 2
    client_main: Callable[[list[str]], int | None] = module.main
    return client_main(argv) or 0


if __name__ == "__main__":
    main()
