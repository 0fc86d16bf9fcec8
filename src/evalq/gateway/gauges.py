"""The gateway's Prometheus view of the queue: gauges read from its history index and worker
registry at each scrape, and the queue waits and run times it observes as jobs start and end
(docs/DESIGN.md, "Metrics")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ..lifecycle import STATES
from ..metrics import GatewayMetrics, collector, gauge
from ..registry import Registry
from ..schemas import TERMINAL, JobSummary
from .history import History, micros

__all__ = ["watch_queue"]


def watch_queue(metrics: GatewayMetrics, history: History, registry: Registry) -> None:
    """Export `history` and `registry` as gauges, and observe each job's start and end."""

    def collect() -> Iterator[Any]:
        index = history.index
        live = registry.live()
        # Every (pool, status) and (pool, state) is written, 0 included: a series that comes
        # and goes with the work would read as missing data, not as none.
        pools = sorted(set(index.pools()) | {w.pool for w in live})
        counts: dict[tuple[str, ...], float] = {(p, s): 0.0 for p in pools for s in STATES}
        counts.update({key: float(n) for key, n in index.pool_status_counts().items()})
        yield gauge("evalq_jobs", "Jobs in the history, by pool and status", ["pool", "status"], counts)
        pieces: dict[tuple[str, ...], float] = {(p, s): 0.0 for p in pools for s in ("held", "waiting", "running")}
        oldest: dict[tuple[str, ...], float] = {(p,): 0.0 for p in pools}
        clock = time.time()
        for pool in pools:
            for job in index.live(pool):
                states = (("held", job.pieces_held), ("waiting", job.pieces_waiting), ("running", job.pieces_running))
                for state, n in states:
                    pieces[(pool, state)] = pieces.get((pool, state), 0.0) + n
                if job.status == "queued":
                    waited = clock - micros(job.created_at) / 1e6
                    oldest[(pool,)] = max(oldest.get((pool,), 0.0), waited)
        yield gauge("evalq_pieces", "Pieces of started sharded jobs, by pool and state", ["pool", "state"], pieces)
        yield gauge(
            "evalq_queue_oldest_wait_seconds", "Seconds the oldest queued job of a pool has waited", ["pool"], oldest
        )
        workers: dict[tuple[str, ...], float] = {(p, s): 0.0 for p in pools for s in ("idle", "busy")}
        for worker in live:
            key = (worker.pool, "busy" if worker.current_job else "idle")
            workers[key] = workers.get(key, 0.0) + 1
        yield gauge("evalq_workers", "Live workers, by pool and state (idle, busy)", ["pool", "state"], workers)
        loaded: dict[tuple[str, ...], float] = {(): 1.0 if history.loaded.is_set() else 0.0}
        yield gauge("evalq_history_loaded", "1 once the gateway's job history is loaded", [], loaded)

    collector(metrics.registry, collect)

    def observe(before: JobSummary | None, after: JobSummary) -> None:
        was = before.status if before is not None else "queued"
        if after.status == "running" and was == "queued" and after.started_at:
            waited = (micros(after.started_at) - micros(after.created_at)) / 1e6
            metrics.queue_wait.labels(after.pool).observe(max(0.0, waited))
        if after.status in TERMINAL and was not in TERMINAL and after.started_at and after.completed_at:
            ran = (micros(after.completed_at) - micros(after.started_at)) / 1e6
            metrics.run_time.labels(after.pool, after.status).observe(max(0.0, ran))

    history.observers.append(observe)
