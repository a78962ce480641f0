"""The Django Channels peer: its tutorial chat consumer, on uvicorn.

The consumer is the Channels tutorial's (an ``AsyncWebsocketConsumer`` that
joins the group of the room named in its URL on connect, ``group_send``-s
what it receives to that group, and writes each group message to its
socket), in the same chat shape the other peers serve: a message is stamped
(id, sender, ms timestamp), sent to the whole room, sender included, on
every pod, and acknowledged with its id. Routing is ``ProtocolTypeRouter`` +
``URLRouter``; the Django settings are configured in code (no project
scaffold). The channel layer keeps channels_redis's documented defaults
(``capacity`` 100, ``expiry`` 60 s, ``group_expiry`` 86,400 s, msgpack; the
connection pool is redis-py's default, 100 connections): that default is
what a team gets. Like the other peers: no auth, no origin check.

``--layer core`` is channels_redis's default ``RedisChannelLayer``;
``--layer pubsub`` its ``RedisPubSubChannelLayer``. channels_redis logs the
messages it drops ("N of M channels over capacity in group ...") at INFO:
this peer logs that logger at INFO so the bench can count them.

    python bench/peers/django_channels.py --port 8003 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from typing import Any

import uvicorn
from channels.generic.websocket import AsyncWebsocketConsumer

LAYERS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}


class MessageIds:
    """Message ids unique across pods: the pod's prefix and a counter."""

    def __init__(self, pod_id: str) -> None:
        self.prefix = f"{pod_id}-{os.urandom(3).hex()}"
        self.count = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self.count):x}"


class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    def __init__(self, *args: Any, ids: MessageIds, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ids = ids

    async def connect(self) -> None:
        self.room = self.scope["url_route"]["kwargs"]["room"]
        self.room_group_name = f"chat_{self.room}"
        # join the room group, then accept: the 101 means "in the room"
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, close_code: int) -> None:
        await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        payload = json.loads(text_data or "{}")
        message_id = self.ids.next()
        await self.channel_layer.group_send(
            self.room_group_name,
            {
                "type": "chat.message",
                "room": self.room,
                "id": message_id,
                "from": self.channel_name,
                "ts": time.time_ns() // 1_000_000,
                "data": payload.get("data"),
            },
        )
        ack = {"type": "ack", "ref": payload.get("ref"), "id": message_id}
        await self.send(text_data=json.dumps(ack))

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send(
            text_data=json.dumps(
                {
                    "type": "message",
                    "room": event["room"],
                    "id": event["id"],
                    "from": event["from"],
                    "ts": event["ts"],
                    "data": event["data"],
                }
            )
        )


def configure(redis_url: str, layer: str) -> None:
    """The Django settings this peer needs, in code."""
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        INSTALLED_APPS=["channels"],
        CHANNEL_LAYERS={
            "default": {"BACKEND": LAYERS[layer], "CONFIG": {"hosts": [redis_url]}},
        },
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "loggers": {
                "channels_redis": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            },
        },
    )
    django.setup()


def make_app(redis_url: str, layer: str, pod_id: str) -> Any:
    configure(redis_url, layer)
    from channels.routing import ProtocolTypeRouter, URLRouter
    from django.urls import path

    websocket_urlpatterns = [
        path("ws/chat/<str:room>/", ChatConsumer.as_asgi(ids=MessageIds(pod_id))),
    ]
    return ProtocolTypeRouter({"websocket": URLRouter(websocket_urlpatterns)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--pod-id", default="django")
    parser.add_argument("--layer", choices=sorted(LAYERS), default="core")
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.redis, args.layer, args.pod_id),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
