"""Prometheus metrics of the gateway, served at /metrics.

Names follow the serving anchors (vLLM / SGLang / Dynamo): request counts by route and status,
time to first token, inter-token latency, requests in flight, and per decode instance the queue
depth, running sequences and KV usage: the Stats a tokenizer instance already polls for
placement (its Placement RPC, answered from memory), read at scrape time.
Each app owns its own CollectorRegistry, so two apps in one process never share counters.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.chat.types import ChatEvent

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class DecodeLoad:
    instance: str
    queued: int
    running: int
    kv_blocks_total: int
    kv_blocks_free: int
    device: str = ""  # where it computes, and with which kernels (its Stats' Backend)
    ops: str = ""
    dtype: str = ""

    @property
    def kv_usage(self) -> float:
        used = self.kv_blocks_total - self.kv_blocks_free
        return used / self.kv_blocks_total if self.kv_blocks_total else 0.0


StatsSource = Callable[[], Awaitable[Sequence[DecodeLoad]]]


async def _no_stats() -> Sequence[DecodeLoad]:
    return ()


class ServiceRestarts(Collector):
    """`k2_service_restarts_total{service}`: restarts by the supervisor that runs this suite
    (`k2serve up`), read from the state file it keeps (processes.SUPERVISOR_STATE_ENV) at each
    scrape."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "k2_service_restarts", "Restarts of each service process", labels=["service"]
        )
        try:
            restarts = json.loads(self.path.read_text()).get("restarts", {})
        except (OSError, ValueError):
            restarts = {}
        for name, count in sorted(restarts.items()):
            family.add_metric([name], count)
        yield family


class GatewayMetrics:
    def __init__(
        self, stats_source: StatsSource | None = None, supervisor_state: Path | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if supervisor_state is not None:
            r.register(ServiceRestarts(supervisor_state))
        self.requests = Counter(
            "k2_gateway_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.in_flight = Gauge("k2_gateway_requests_in_flight", "Generations in flight", registry=r)
        self.ignored = Counter(
            "k2_gateway_ignored_fields",
            "Requests that carried a field accepted and ignored (gateway/field_policy.py)",
            ["route", "field"],
            registry=r,
        )
        self.ttft = Histogram(
            "k2_gateway_time_to_first_token_seconds",
            "From request arrival to the first generated delta",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "k2_gateway_inter_token_latency_seconds",
            "Between consecutive generated deltas of a request",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queued = Gauge(
            "k2_decode_queued_requests", "Decode queue depth", ["instance"], registry=r
        )
        self.running = Gauge(
            "k2_decode_running_requests", "In the decode batch", ["instance"], registry=r
        )
        self.kv_usage = Gauge(
            "k2_decode_kv_usage_ratio", "Used / total KV blocks", ["instance"], registry=r
        )
        self.backend = Gauge(
            "k2_decode_backend_info",
            "1 per decode instance: its device, ops backend and compute dtype",
            ["instance", "device", "ops", "dtype"],
            registry=r,
        )
        self._stats_source = stats_source or _no_stats

    async def render(self) -> bytes:
        try:
            loads = await self._stats_source()
        except Exception as e:  # a scrape must not fail because one decode is down
            log.warning("decode stats unavailable: %s", e)
            loads = ()
        for load in loads:
            self.queued.labels(load.instance).set(load.queued)
            self.running.labels(load.instance).set(load.running)
            self.kv_usage.labels(load.instance).set(load.kv_usage)
            if load.ops:
                self.backend.labels(load.instance, load.device, load.ops, load.dtype).set(1)
        return generate_latest(self.registry)

    async def timed(
        self, events: AsyncIterator[ChatEvent], model: str, start: float
    ) -> AsyncIterator[ChatEvent]:
        """Pass events through, recording TTFT at the first delta with output and ITL after."""
        last: float | None = None
        async for event in events:
            if event.content or event.reasoning or event.tool_calls:
                now = time.perf_counter()
                if last is None:
                    self.ttft.labels(model).observe(now - start)
                else:
                    self.itl.labels(model).observe(now - last)
                last = now
            yield event


class RequestCounter:
    """ASGI middleware: counts every response by its route template and status code."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # No response started: 500 if the app raised (the outer error middleware answers),
        # else 499, nginx's "client closed request".
        status = {"code": 499}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            status["code"] = 500 if status["code"] == 499 else status["code"]
            raise
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status["code"])).inc()
