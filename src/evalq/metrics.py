"""Prometheus metrics: what each process exports, and the port that serves them with health
and readiness probes (docs/DESIGN.md, "Metrics").

Each component keeps its own registry (a test runs many gateways in one process; `evalq up`
runs a gateway, a worker and the web process in one), and a process serves the registries of
the components it runs on `metrics_port`. Labels are bounded: pools, statuses, endpoints,
outcomes and event types, never a job id or a team.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .schemas import Event, Started, event_type

__all__ = [
    "DURATION_BUCKETS",
    "EventMetrics",
    "GatewayMetrics",
    "MetricsServer",
    "WebMetrics",
    "WorkerMetrics",
    "collector",
]

log = logging.getLogger("evalq")

# From a second to a day: queue waits and evaluations both span that range.
DURATION_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400, float("inf"))
# Request latencies: a millisecond to ten seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))


class _Collect(Collector):
    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Any]:
        try:
            yield from self._collect()
        except Exception as exc:  # a scrape must answer even when a view is half-built
            log.warning("metrics: %s", exc)


def collector(registry: CollectorRegistry, collect: Callable[[], Iterable[Any]]) -> None:
    """Register `collect`, called at each scrape, in `registry`."""
    registry.register(_Collect(collect))


def gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class EventMetrics:
    """Events sent, by type: the gateway's and a worker's."""

    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        # A name per component: `evalq up` serves a gateway's and a worker's registries on one
        # port, and one family may be written only once.
        self.sent = Counter(
            f"evalq_{component}_events_published_total",
            f"Job status events a {component} sent",
            ["type"],
            registry=registry,
        )


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "evalq_gateway_requests_total",
            "Requests a gateway answered, by endpoint and outcome (ok, or the error's code)",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "evalq_gateway_request_duration_seconds",
            "Seconds a gateway took to answer, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "evalq_job_queue_wait_seconds",
            "Seconds from submission to start, per pool (observed as a gateway sees a job start)",
            ["pool"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "evalq_job_run_seconds",
            "Seconds from start to end, per pool and terminal status",
            ["pool", "status"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.events = EventMetrics(self.registry, "gateway")

    def request(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.requests.labels(endpoint, outcome).inc()
        self.latency.labels(endpoint).observe(seconds)


class WorkerMetrics:
    def __init__(
        self,
        pool: str,
        busy: Callable[[], bool],
        gpus: Callable[[], dict[str, tuple[float, float]]] = dict,
    ) -> None:
        self.pool = pool
        self.registry = CollectorRegistry()

        def memory() -> Iterator[Any]:
            readings = gpus()
            if readings:
                used: dict[tuple[str, ...], float] = {(gpu,): u for gpu, (u, _) in readings.items()}
                total: dict[tuple[str, ...], float] = {(gpu,): t for gpu, (_, t) in readings.items()}
                doc = "GPU memory in use, per GPU a job sees (nvidia-smi)"
                yield gauge("evalq_worker_gpu_memory_used_bytes", doc, ["gpu"], used)
                yield gauge("evalq_worker_gpu_memory_total_bytes", "GPU memory, per GPU a job sees", ["gpu"], total)

        collector(self.registry, memory)
        collector(
            self.registry,
            lambda: [
                gauge(
                    "evalq_worker_busy", "1 while the worker holds a job or piece", ["pool"], {(pool,): float(busy())}
                )
            ],
        )
        self.events = EventMetrics(self.registry, "worker")
        self.jobs = Counter(
            "evalq_worker_jobs_total",
            "Jobs and pieces a worker ended, by pool and outcome",
            ["pool", "outcome"],
            registry=self.registry,
        )
        self.model_loads = Counter(
            "evalq_worker_model_loads_total",
            "Job starts by how their model was had: loaded, reused (resident), swapped (weights), none (re-score)",
            ["pool", "how"],
            registry=self.registry,
        )

    def observe(self, event: Event) -> None:
        """Count an event this worker sent, and what it says of the work done."""
        kind = event_type(event)
        self.events.sent.labels(kind).inc()
        if kind in ("completed", "failed", "cancelled", "requeued", "shard_completed", "shard_failed"):
            self.jobs.labels(self.pool, kind).inc()
        if isinstance(event, Started):
            how = (
                "none"
                if not event.loads_model
                else "swapped"
                if event.weights_swapped
                else ("reused" if event.model_reused else "loaded")
            )
            self.model_loads.labels(self.pool, how).inc()


class WebMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "evalq_web_requests_total",
            "HTTP requests the web process answered, by route and status code",
            ["route", "code"],
            registry=self.registry,
        )


class MetricsServer:
    """`/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz` (it
    serves: `ready()` is true) on one port, plain HTTP/1.1."""

    def __init__(
        self,
        registries: list[CollectorRegistry],
        *,
        host: str,
        port: int,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.registries = registries
        self.host = host
        self.port = port
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MetricsServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics, health and readiness on http://%s:%d", self.host, self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def render(self) -> bytes:
        return b"".join(generate_latest(registry) for registry in self.registries)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers: nothing here depends on them
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            method = parts[0] if parts else ""
            if method not in ("GET", "HEAD"):
                status, kind, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                started = time.perf_counter()
                status, kind, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
                log.debug("metrics rendered in %.3fs", time.perf_counter() - started)
            elif path == "/healthz":
                status, kind, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ok = self.ready()
                status, kind, body = (
                    ("200 OK" if ok else "503 Service Unavailable"),
                    "text/plain",
                    (b"ready\n" if ok else b"not ready\n"),
                )
            else:
                status, kind, body = "404 Not Found", "text/plain", b"/metrics, /healthz or /readyz\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
