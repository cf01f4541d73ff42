"""What a node tells about itself: Prometheus metrics, the access log, recent requests and
its own warnings (for the dashboard).

Per-request figures (counts, TTFT, inter-token gaps, tokens) are observed as each request
ends; the engine's and the cluster's figures are read when a scraper asks, from the same
stats `/health` shows, so the two never disagree.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
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
from prometheus_client.registry import Collector

from ..serving.telemetry import RequestRecord

access_log = logging.getLogger("exo_tools.access")

# The routes that generate, and the name each API goes by in metrics and the page.
API_BY_ROUTE: Mapping[str, str] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
}
GENERATION_APIS = frozenset(API_BY_ROUTE.values())
RECENT_REQUESTS = 50
RECENT_WARNINGS = 50
# Buckets fitted to this kind of server: a first token in 50 ms to a minute (long prompts
# on a CPU), tokens 5 ms to 2 s apart.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
DURATION_BUCKETS = (0.01, 0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class WarningLog(logging.Handler):
    """The node's last warnings and errors, as the dashboard shows them."""

    def __init__(self, size: int = RECENT_WARNINGS) -> None:
        super().__init__(level=logging.WARNING)
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call must not break the node
            message = str(record.msg)
        self.entries.append(
            {
                "time": record.created,
                "level": record.levelname.lower(),
                "source": record.name,
                "message": message,
            }
        )


class Telemetry:
    """One node's metrics registry, recent requests and warnings.

    `stats` returns the node's `/health` body and `cluster` its `/v1/cluster` view (or None);
    both are read at scrape time.
    """

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        cluster: Callable[[], dict[str, Any] | None],
    ) -> None:
        self.registry = CollectorRegistry()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self.in_flight: dict[str, RequestRecord] = {}
        self.warnings = WarningLog()
        self.completion_tokens_done = 0  # of requests already ended (the page's tok/s)
        registry = self.registry
        self.requests = Counter(
            "exo_tools_requests",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "exo_tools_request_duration_seconds",
            "Time from a request's arrival to its last byte.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "exo_tools_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token.",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.token_gap = Histogram(
            "exo_tools_inter_token_latency_seconds",
            "Time between consecutive tokens of one request.",
            ["api"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "exo_tools_prompt_tokens",
            "Prompt tokens of answered requests.",
            ["api"],
            registry=registry,
        )
        self.cached_tokens = Counter(
            "exo_tools_cached_prompt_tokens",
            "Prompt tokens the prefix cache served instead of a prefill.",
            ["api"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "exo_tools_completion_tokens", "Generated tokens.", ["api"], registry=registry
        )
        self.active = Gauge(
            "exo_tools_http_requests_in_flight",
            "HTTP requests being answered by this node (forwarded ones included).",
            registry=registry,
        )
        registry.register(_StatsCollector(stats, cluster))
        # The standard process figures (RSS, open fds, CPU seconds) and Python's version.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

    # ---------------------------------------------------------------- requests

    def begin(self, record: RequestRecord) -> None:
        self.in_flight[record.request_id] = record
        self.active.inc()

    def end(self, record: RequestRecord, log_level: int = logging.INFO) -> None:
        """Count a finished request, log its access line and keep it for the page."""
        self.in_flight.pop(record.request_id, None)
        self.active.dec()
        status = str(record.status)
        self.requests.labels(record.method, record.route, status).inc()
        if record.duration_s is not None:
            self.duration.labels(record.route).observe(record.duration_s)
        generated = record.api in GENERATION_APIS and record.forwarded_to is None
        if generated:
            api = record.api
            if record.first_token_s is not None:
                self.first_token.labels(api).observe(record.first_token_s)
            gaps = self.token_gap.labels(api)
            for gap in record.token_gaps:
                gaps.observe(gap)
            record.token_gaps.clear()
            self.prompt_tokens.labels(api).inc(record.prompt_tokens)
            self.cached_tokens.labels(api).inc(record.cached_tokens)
            self.completion_tokens.labels(api).inc(record.completion_tokens)
            self.completion_tokens_done += record.completion_tokens
        if record.api in GENERATION_APIS:
            self.recent.appendleft(describe(record))
        access_log.log(log_level, access_line(record))

    def tokens_generated(self) -> int:
        """Every token this node generated so far, those of running requests included."""
        running = sum(record.completion_tokens for record in self.in_flight.values())
        return self.completion_tokens_done + running

    def running(self) -> list[dict[str, Any]]:
        return [
            describe(record) for record in self.in_flight.values() if record.api in GENERATION_APIS
        ]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def describe(record: RequestRecord) -> dict[str, Any]:
    """A request as the dashboard lists it."""
    rate = record.decode_tokens_per_s
    return {
        "id": record.request_id,
        "time": record.started_at,
        "api": record.api,
        "model": record.model,
        "status": record.status,
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "completion_tokens": record.completion_tokens,
        "ttft_s": _rounded(record.first_token_s),
        "duration_s": _rounded(record.duration_s),
        "tokens_per_s": _rounded(rate, 1),
        "finish_reason": record.finish_reason,
        "forwarded_to": record.forwarded_to,
    }


def access_line(record: RequestRecord) -> str:
    """One line per request: what a person grepping the node's log wants to see."""
    parts = [
        record.method,
        record.route,
        str(record.status),
        f"id={record.request_id}",
        f"duration={record.duration_s or 0.0:.3f}s",
    ]
    if record.forwarded_to is not None:
        parts.append(f"forwarded_to={record.forwarded_to}")
    elif record.api in GENERATION_APIS:
        ttft = "-" if record.first_token_s is None else f"{record.first_token_s:.3f}s"
        parts += [
            f"model={record.model or '-'}",
            f"prompt_tokens={record.prompt_tokens}",
            f"cached_tokens={record.cached_tokens}",
            f"completion_tokens={record.completion_tokens}",
            f"ttft={ttft}",
            f"finish={record.finish_reason or '-'}",
        ]
        if record.failovers:
            parts.append(f"failovers={record.failovers}")
    return " ".join(parts)


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class _StatsCollector(Collector):
    """The engine's and cluster's figures, read from the node's stats at each scrape."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        cluster: Callable[[], dict[str, Any] | None],
    ) -> None:
        self._stats = stats
        self._cluster = cluster

    def describe(self) -> list[Metric]:
        return []  # the families depend on the node's state; nothing to check up front

    def collect(self) -> Iterator[Metric]:
        health = self._stats()
        yield from _node_metrics(health)
        yield from _engine_metrics(health)
        view = self._cluster()
        if view is not None:
            yield from _cluster_metrics(view)


def _gauge(name: str, documentation: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield CounterMetricFamily(name, documentation, value=value)


def _node_metrics(health: dict[str, Any]) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "exo_tools_node_info",
        "This node: its id, role, model and version (the value is always 1).",
        labels=["node_id", "master", "model", "version", "status"],
    )
    node_id = str(health.get("node_id", "local"))
    master = str(health.get("master") or node_id)
    labels = [node_id, master, str(health.get("model")), str(health.get("version"))]
    info.add_metric([*labels, str(health.get("status"))], 1)
    yield info
    yield from _gauge(
        "exo_tools_ready",
        "1 once this node can answer generation requests (as /ready), else 0.",
        1.0 if health.get("ready") else 0.0,
    )
    memory = health.get("memory") or {}
    yield from _gauge("exo_tools_resident_memory_bytes", "The node's RSS.", memory.get("rss"))
    yield from _gauge(
        "exo_tools_weight_bytes",
        "The bytes of this node's model weights.",
        health.get("weight_bytes"),
    )
    yield from _gauge(
        "exo_tools_mlx_active_memory_bytes", "MLX's active memory.", memory.get("mlx_active")
    )
    placements = health.get("placements") or {}
    yield from _counter(
        "exo_tools_placements", "Placements this node made as master.", placements.get("placed")
    )
    yield from _counter(
        "exo_tools_re_placements",
        "Placements that replaced an earlier one (a node left or joined, a stage failed).",
        placements.get("re_placed"),
    )


def _engine_metrics(health: dict[str, Any]) -> Iterator[Metric]:
    scheduler = health.get("scheduler") or {}
    yield from _gauge(
        "exo_tools_requests_running", "Requests this stage decodes.", scheduler.get("running")
    )
    yield from _gauge(
        "exo_tools_requests_queued",
        "Requests waiting for room (--max-running or the KV budget).",
        scheduler.get("queued"),
    )
    yield from _gauge(
        "exo_tools_kv_reserved_bytes",
        "KV cache bytes reserved by running requests.",
        scheduler.get("kv_reserved_bytes"),
    )
    yield from _gauge(
        "exo_tools_kv_budget_bytes", "The KV cache budget.", scheduler.get("kv_budget_bytes")
    )
    rows = scheduler.get("batch_rows") or {}
    if rows:
        yield _histogram(
            "exo_tools_decode_batch_rows",
            "Requests in each batched decode pass.",
            {int(size): count for size, count in rows.items()},
            BATCH_ROW_BUCKETS,
        )
    pipeline = health.get("pipeline") or {}
    yield from _counter(
        "exo_tools_stage_busy_seconds",
        "Seconds this node's MLX thread spent computing.",
        pipeline.get("busy_s"),
    )
    hop = pipeline.get("hop_us_median")
    yield from _gauge(
        "exo_tools_hop_latency_median_seconds",
        "Median time an activation took to reach this stage (recent hops).",
        None if hop is None else hop / 1e6,
    )
    reduce = pipeline.get("allreduce_us_median")
    yield from _gauge(
        "exo_tools_allreduce_latency_median_seconds",
        "Median tensor-parallel all-reduce time (recent ones).",
        None if reduce is None else reduce / 1e6,
    )
    prefix = health.get("prefix_cache") or {}
    yield from _counter(
        "exo_tools_prefix_cache_lookup_tokens",
        "Prompt tokens looked up in the prefix cache.",
        prefix.get("prompt_tokens"),
    )
    yield from _counter(
        "exo_tools_prefix_cache_hit_tokens",
        "Prompt tokens found in the prefix cache.",
        prefix.get("cached_prompt_tokens"),
    )
    yield from _gauge(
        "exo_tools_prefix_cache_bytes",
        "Bytes held by this stage's prefix cache.",
        prefix.get("bytes"),
    )
    yield from _gauge(
        "exo_tools_prefix_cache_entries",
        "Entries in this stage's prefix cache.",
        prefix.get("entries"),
    )


def _histogram(
    name: str, documentation: str, counts: Mapping[int, int], bounds: tuple[int, ...]
) -> HistogramMetricFamily:
    """A histogram family from exact counts per value."""
    buckets: list[tuple[str, float]] = []
    for bound in bounds:
        buckets.append((str(float(bound)), float(sum(n for v, n in counts.items() if v <= bound))))
    buckets.append(("+Inf", float(sum(counts.values()))))
    total = float(sum(value * n for value, n in counts.items()))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _cluster_metrics(view: dict[str, Any]) -> Iterator[Metric]:
    nodes = view.get("nodes") or []
    yield from _gauge(
        "exo_tools_cluster_nodes_healthy",
        "Nodes this node sees as healthy members (itself included).",
        sum(1 for node in nodes if node.get("healthy")),
    )
    latency = GaugeMetricFamily(
        "exo_tools_cluster_link_latency_seconds",
        "Heartbeat round-trip time of each link this node knows.",
        labels=["source", "target"],
    )
    for link in view.get("links") or []:
        if link.get("latency_ms") is not None:
            latency.add_metric([link["source"], link["target"]], link["latency_ms"] / 1000)
    yield latency
