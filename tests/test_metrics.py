"""Prometheus metrics, scraped from real processes while they work: a gateway and a worker
started as `evalq gateway --metrics-port` and `evalq worker --metrics-port`, and the web
process; each value is checked against what the test did, the text parses as Prometheus
text, and no label set grows with the number of jobs."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evalq import AsyncClient, InvalidField
from evalq.config import Settings
from evalq.metrics import GatewayMetrics, MetricsServer, WebMetrics, WorkerMetrics
from evalq.worker.gpu_memory import parse as parse_gpus

from .conftest import EVALQ, Processes, settings_env
from .jobs import FAKE, JOB
from .test_deploy import DEPLOY
from .test_embedded import free_port
from .waiting import eventually

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def get(port: int, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.to_thread(fetch)


def parse(text: str) -> Samples:
    """Every sample by (name, labels); raises if the text is not Prometheus text."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> Samples:
    status, text = await get(port, "/metrics")
    assert status == 200, text
    return parse(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_gateway_and_worker_metrics_count_what_they_did(
    settings: Settings, processes: Processes, nc: Any
) -> None:
    env = settings_env(settings)
    gateway_port, worker_port = free_port(), free_port()
    processes.start([*EVALQ, "gateway", "--metrics-port", str(gateway_port)], env, name="gateway")
    await eventually(
        lambda: get(gateway_port, "/readyz"),
        until=lambda r: r[0] == 200,
        what="the gateway ready",
        timeout=60,
        retry_on=(urllib.error.URLError,),
    )
    assert (await get(gateway_port, "/healthz"))[0] == 200 and (await get(gateway_port, "/nope"))[0] == 404

    async with AsyncClient(settings) as client:
        ids = [(await client.submit(**JOB)).job_id for _ in range(3)]
        with pytest.raises(InvalidField):
            await client.submit(**JOB, priority="whenever")
        before = await scrape(gateway_port)
        assert value(before, "evalq_gateway_requests_total", endpoint="submit", outcome="ok") == 3
        assert value(before, "evalq_gateway_requests_total", endpoint="submit", outcome="422") == 1
        assert value(before, "evalq_gateway_request_duration_seconds_count", endpoint="submit") == 4
        assert value(before, "evalq_jobs", pool="default", status="queued") == 3
        assert value(before, "evalq_queue_oldest_wait_seconds", pool="default") > 0
        assert value(before, "evalq_gateway_events_published_total", type="queued") == 3
        assert value(before, "evalq_history_loaded") == 1

        worker_env = {**env, "EVALQ_EVALUATOR": " ".join(FAKE), "EVALQ_METRICS_PORT": str(worker_port)}
        processes.start([*EVALQ, "worker"], worker_env, name="worker")
        for job_id in ids:
            await client.wait_for_job(job_id, timeout=120)
        await eventually(
            lambda: get(worker_port, "/readyz"), what="the worker's port", timeout=30, retry_on=(urllib.error.URLError,)
        )
        after = await eventually(
            lambda: scrape(gateway_port),
            until=lambda s: value(s, "evalq_workers", pool="default", state="idle") == 1,
            what="the worker idle in the gateway's metrics",
            timeout=30,
        )
        assert value(after, "evalq_jobs", pool="default", status="queued") == 0
        assert value(after, "evalq_jobs", pool="default", status="completed") == 3
        assert value(after, "evalq_job_queue_wait_seconds_count", pool="default") == 3
        assert value(after, "evalq_job_run_seconds_count", pool="default", status="completed") == 3
        worker = await scrape(worker_port)
        assert value(worker, "evalq_worker_jobs_total", pool="default", outcome="completed") == 3
        assert value(worker, "evalq_worker_events_published_total", type="completed") == 3
        assert value(worker, "evalq_worker_model_loads_total", pool="default", how="loaded") == 3
        assert value(worker, "evalq_worker_busy", pool="default") == 0
        assert (await get(worker_port, "/readyz"))[0] == 200

        # Three more jobs: counts move, the label sets stay as they were.
        more = [(await client.submit(**JOB)).job_id for _ in range(3)]
        for job_id in more:
            await client.wait_for_job(job_id, timeout=120)
        again = await eventually(
            lambda: scrape(gateway_port),
            until=lambda s: value(s, "evalq_jobs", pool="default", status="completed") == 6,
            what="six completed jobs in the gateway's metrics",
            timeout=30,
        )
        assert set(again) == set(after), "a label set grew with the number of jobs"
        assert set(await scrape(worker_port)) == set(worker)
        assert all(job_id not in str(key) for key in again for job_id in ids + more)
    # The shipped alert rules and dashboard name only metrics the processes export.
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    assert [r["alert"] for r in rules["groups"][0]["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "evalq.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r["expr"] for r in rules["groups"][0]["rules"]]
    referenced = set(re.findall(r"\bevalq_[a-z_]+", " ".join(exprs)))
    exported = {name for name, _ in again} | {name for name, _ in worker}
    assert referenced and referenced <= exported, referenced - exported


async def test_the_web_process_serves_its_metrics_and_counts_requests_by_route(
    settings: Settings, gateway: Any, processes: Processes
) -> None:
    web_port, metrics_port = free_port(), free_port()
    argv = [*EVALQ, "ui", "--port", str(web_port), "--metrics-port", str(metrics_port)]
    processes.start(argv, settings_env(settings), name="ui")
    await eventually(
        lambda: get(metrics_port, "/readyz"),
        until=lambda r: r[0] == 200,
        what="the web process ready",
        timeout=60,
        retry_on=(urllib.error.URLError,),
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}") as http:
        for path in ("/api/queue", "/api/queue", "/no/such/page/1", "/no/such/page/2"):
            await http.get(path)
    samples = await scrape(metrics_port)
    assert value(samples, "evalq_web_requests_total", route="/api", code="200") == 2
    assert value(samples, "evalq_web_requests_total", route="other", code="404") == 2


def test_gpu_memory_is_read_for_the_gpus_a_job_sees() -> None:
    text = "0, GPU-aa, 1024, 81920\n1, GPU-bb, 2048, 81920\n2, GPU-cc, 0, 81920\nnot a row\n"
    everything = parse_gpus(text, None)
    assert everything == {
        "0": (1024 * 2**20, 81920 * 2**20),
        "1": (2048 * 2**20, 81920 * 2**20),
        "2": (0, 81920 * 2**20),
    }
    # CUDA_VISIBLE_DEVICES=2,1: a job's GPU 0 is the host's 2, its GPU 1 the host's 1.
    assert parse_gpus(text, "2,1") == {"0": everything["2"], "1": everything["1"]}
    assert parse_gpus(text, "GPU-bb") == {"0": everything["1"]}
    assert parse_gpus(text, "") == {}  # set but empty: no GPU
    metrics = WorkerMetrics("default", busy=lambda: True, gpus=lambda: parse_gpus(text, "1"))
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "evalq_worker_gpu_memory_used_bytes", gpu="0") == 2048 * 2**20
    assert value(samples, "evalq_worker_busy", pool="default") == 1


def test_one_port_for_several_components_writes_each_family_once() -> None:
    # What `evalq up` serves: a gateway's, a worker's and the web process's registries.
    gateway, worker, web = GatewayMetrics(), WorkerMetrics("default", busy=lambda: False), WebMetrics()
    gateway.events.sent.labels("queued").inc()
    worker.events.sent.labels("completed").inc()
    text = MetricsServer([gateway.registry, worker.registry, web.registry], host="127.0.0.1", port=0).render()
    names = [family.name for family in text_string_to_metric_families(text.decode())]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
