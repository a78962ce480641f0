"""``GET /metrics``: the pod's counters in the Prometheus text format.

Nothing here runs per message. The node, hub, timeline, backend and
publisher already count what they do, with plain integers and the small
histograms of ``realtime.core.histogram``; ``NodeCollector`` reads them
when Prometheus scrapes (a custom collector of prometheus-client), so the
delivery path pays nothing for metrics. Process metrics come from
prometheus-client's default collectors (process, platform, GC).

The names are a public contract (README: *Metrics*; the dashboard and
alerts in ``deploy/`` use them). No label takes a room, user or connection
id: every label has a small, fixed set of values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from realtime import Node
from realtime.core.histogram import ROUNDTRIP_BUCKETS, Histogram
from realtime.core.protocol import ErrorCode

from .hooks import RESULTS, Hooks

__all__ = ["CONTENT_TYPE", "HookCollector", "NodeCollector", "make_registry", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Label values shown at 0 before anything happened, so that rate() and
# alerts see a series from the first scrape.
_CLOSE_CODES = ("1000", "1001", "1006", "1008", "1009", "1011", "1013")
_REFUSALS = ("http_400", "http_401", "http_403", "http_503")
_SCOPES = ("room", "global", "api")
_CATCHUP_RESULTS = ("complete", "window_exceeded", "epoch_changed", "unknown_offset", "unavailable")


class NodeCollector(Collector):
    """Reads a ``Node``'s counters at scrape time."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._no_roundtrip = Histogram(ROUNDTRIP_BUCKETS)
        """Shown (all zero) when the backend has no Redis publisher."""

    def collect(self) -> Iterator[Metric]:
        node = self._node
        counters = node.counters
        hub = node.hub.counters
        timeline = node.timeline.counters
        backend = node.backend.stats()

        yield GaugeMetricFamily(
            "chat_api_connections", "Open WebSocket connections.", node.hub.connection_count
        )
        yield CounterMetricFamily(
            "chat_api_connections_opened",
            "WebSocket connections accepted.",
            counters.connections_accepted,
        )
        closed = _seeded(counters.closed, _CLOSE_CODES)
        closed.update(_seeded({f"http_{s}": n for s, n in counters.refused.items()}, _REFUSALS))
        yield _labelled(
            "chat_api_connections_closed",
            "WebSocket connections closed, by close code (the server's if it closed first, "
            "else the client's; 1006: no close frame), and upgrades refused before the "
            "handshake, by HTTP status (http_400, http_401, http_403, http_503).",
            "code",
            closed,
        )
        yield CounterMetricFamily(
            "chat_api_frames_received",
            "Text and binary frames received from clients.",
            counters.frames_received,
        )
        yield _labelled(
            "chat_api_errors_sent",
            "Error frames sent to clients, by error code (rejected: by the publish hook, "
            "whatever code it gave).",
            "code",
            _seeded(counters.errors, [*(code.value for code in ErrorCode), "rejected"]),
        )
        yield _labelled(
            "chat_api_messages_published",
            "Messages published by this pod, by scope: room (a client's room message), "
            "global (a client's message to everyone), api (the HTTP publish API).",
            "scope",
            _seeded(counters.published, _SCOPES),
        )
        yield CounterMetricFamily(
            "chat_api_deliveries",
            "Frames of broadcasts queued to this pod's connections (one per recipient).",
            hub.deliveries,
        )
        yield _histogram(
            "chat_api_delivery_lag_seconds",
            "Seconds from a message's server timestamp to its delivery on this pod, once per "
            "message (not per recipient); includes clock differences between pods.",
            node.delivery_lag,
        )
        yield GaugeMetricFamily(
            "chat_api_redis_link_up",
            "1 while the pod's Redis link is up (and in local-only mode, which needs none), "
            "else 0.",
            1 if node.link_up else 0,
        )
        yield CounterMetricFamily(
            "chat_api_redis_reconnects",
            "Redis subscriptions rebuilt after a lost link.",
            _number(backend, "reconnects"),
        )
        yield CounterMetricFamily(
            "chat_api_redis_publish_failures",
            "Messages that could not be published to Redis (they reached this pod's clients "
            "only, or none).",
            _number(backend, "publish_failures"),
        )
        yield _histogram(
            "chat_api_redis_roundtrip_seconds",
            "Seconds per round trip of the Redis publisher: one pipelined batch of appends, "
            "publishes and heartbeats, from its write to its last reply.",
            node.backend_roundtrip or self._no_roundtrip,
        )
        yield CounterMetricFamily(
            "chat_api_gap_repairs",
            "Gaps in a room's offsets read from history.",
            timeline.gap_repairs,
        )
        yield _labelled(
            "chat_api_catchups",
            "Catch-ups of joining clients (history, resume), by result.",
            "result",
            _seeded(timeline.catchups, _CATCHUP_RESULTS),
        )
        yield CounterMetricFamily(
            "chat_api_slow_consumers_closed",
            "Connections closed with 1013 because their send buffer was full.",
            hub.slow_client_disconnects,
        )
        yield CounterMetricFamily(
            "chat_api_rate_limited",
            "Client frames refused by the rate limit.",
            counters.rate_limited,
        )


def _seeded(counts: Mapping[str, int], labels: Iterable[str]) -> dict[str, int]:
    out = dict.fromkeys(labels, 0)
    out.update(counts)
    return out


def _labelled(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(values.items()):
        family.add_metric([value], n)
    return family


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(_le(bound), n) for bound, n in histogram.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=histogram.sum)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _number(stats: Mapping[str, object], key: str) -> int:
    value = stats.get(key, 0)
    return value if isinstance(value, int) else 0


class HookCollector(Collector):
    """Reads the backend hooks' counters at scrape time (only the hooks set)."""

    def __init__(self, hooks: Hooks) -> None:
        self._hooks = hooks

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "chat_api_hook_requests",
            "Requests to the team's app's hooks, by hook (connect, publish) and result: accept, "
            "replace (publish: other data), reject (publish) or refuse (connect); error (no "
            "answer, or not 2xx/4xx), invalid (an answer that makes no sense), timeout "
            "(HOOK_TIMEOUT).",
            labels=["hook", "result"],
        )
        seconds = HistogramMetricFamily(
            "chat_api_hook_seconds",
            "Seconds per hook request, from its send to its answer (or its failure).",
            labels=["hook"],
        )
        for health in self._hooks.health:
            for result, n in sorted(_seeded(health.results, RESULTS[health.hook]).items()):
                requests.add_metric([health.hook, result], n)
            buckets = [(_le(bound), n) for bound, n in health.seconds.cumulative()]
            seconds.add_metric([health.hook], buckets, health.seconds.sum)
        failing = GaugeMetricFamily(
            "chat_api_hook_failing",
            "1 while a hook is failing (from its first failed request to its next answer), else 0.",
            labels=["hook"],
        )
        for health in self._hooks.health:
            failing.add_metric([health.hook], 0 if health.failing_since is None else 1)
        yield requests
        yield seconds
        yield failing


def make_registry(node: Node, hooks: Hooks | None = None) -> CollectorRegistry:
    """A registry of the pod's own (never the process-global one): the node's
    collector, the hooks' (if any) and prometheus-client's process, platform
    and GC collectors."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    if hooks is not None:
        registry.register(HookCollector(hooks))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the Prometheus text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
