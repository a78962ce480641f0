"""Fixtures: real chat-api processes on free ports, and an HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import aiohttp
import pytest

from .support import Pod

PodFactory = Callable[..., Pod]


@pytest.fixture
def pod_factory() -> Iterator[PodFactory]:
    """Start pods with ``pod_factory(env, name=...)``; all are stopped afterwards."""
    pods: list[Pod] = []

    def start(env: Mapping[str, str] | None = None, *, name: str | None = None) -> Pod:
        pod = Pod(env, name=name or f"pod{len(pods) + 1}")
        pods.append(pod)
        return pod.start()

    yield start
    for pod in pods:
        pod.kill()


@pytest.fixture
def pod(pod_factory: PodFactory) -> Pod:
    """One local-only pod."""
    return pod_factory()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s
