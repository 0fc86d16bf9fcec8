"""The worker, end to end: real NATS, real lmms-eval subprocesses, CPU only, offline."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from evalq import AsyncClient, JobFailed
from evalq.config import Settings
from evalq.jobstore import JobStore
from evalq.policy import PoolPolicy, store_policy
from evalq.schemas import (
    Cancelled,
    Completed,
    EvaluateRequest,
    Failed,
    JobInfo,
    ProgressEvent,
    Queued,
    Requeued,
    Started,
    WorkerInfo,
    WorkItem,
    encode,
    now,
)
from evalq.topology import Topology
from evalq.worker.resident import ResidentJob

from .conftest import Processes
from .events import all_events, follow, kinds
from .jobs import FAKE, JOB
from .tiny_model import build_tiny_model
from .waiting import eventually

pytestmark = pytest.mark.slow


async def test_demo_job_end_to_end(client: AsyncClient, worker_factory: Any, tmp_path: Path) -> None:
    handle = await worker_factory()
    accepted = await client.submit(**JOB, labels={"epoch": "1"})
    runners: list[object] = []

    def on_event(event: Any) -> None:
        if isinstance(event, Started) and handle.worker.current is not None:
            runners.append(handle.worker.current.process)

    events = await follow(client, accepted.job_id, on_event=on_event)
    # A single-GPU job runs in the worker's resident model process (forked from its warm
    # evaluator) by default.
    assert runners and isinstance(runners[0], ResidentJob)
    order = kinds(events)
    assert order[0] == "queued" and order[1] == "started" and order[-1] == "completed"
    assert "progress" in order
    assert all(e.labels == {"epoch": "1"} for e in events)
    done = events[-1]
    assert isinstance(done, Completed)
    assert done.metrics["evalq_demo"]["exact_match"] == pytest.approx(0.6)

    info = await client.get_job(accepted.job_id)
    assert info.status == "completed" and info.attempts == 1
    assert info.result is not None and info.result.metrics == done.metrics
    files = await client.results(accepted.job_id, tmp_path / "download")
    names = {f.name for f in files}
    assert {"results.json", "eval.log"} <= names
    assert any(n.endswith(".jsonl") for n in names)
    results = json.loads((tmp_path / "download" / accepted.job_id / "results.json").read_text())
    assert results["results"]["evalq_demo"]["exact_match,none"] == pytest.approx(0.6)

    zygote = handle.worker.warm.process
    await handle.stop()
    assert zygote.returncode is not None, "a stopped worker leaves no warm evaluator behind"


async def test_tiny_transformers_model_runs_a_real_forward_pass(
    client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny")
    # Its config needs trust_remote_code, which a pool allows for local paths under its roots.
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    await worker_factory()
    info = await asyncio.wait_for(
        client.submit_and_wait(
            model="huggingface",
            tasks=["evalq_demo"],
            model_args={"pretrained": str(model_dir), "trust_remote_code": True, "device_map": "cpu", "device": "cpu"},
            limit=4,
        ),
        240,
    )
    assert info.status == "completed"
    assert info.result is not None
    assert "exact_match" in info.result.metrics["evalq_demo"]


async def test_unknown_model_fails_without_retry(client: AsyncClient, worker_factory: Any) -> None:
    await worker_factory()
    accepted = await client.submit(model="no_such_model", tasks=["evalq_demo"], limit=2)
    events = await follow(client, accepted.job_id)
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert "no *_results.json" in failed.error
    assert failed.log_tail and "no_such_model" in failed.log_tail
    assert kinds(events).count("started") == 1
    with pytest.raises(JobFailed):
        await client.wait_for_job(accepted.job_id, timeout=10)
    info = await client.get_job(accepted.job_id)
    assert info.status == "failed" and info.attempts == 1


async def test_broken_task_fails_with_the_log_tail(client: AsyncClient, worker_factory: Any, tmp_path: Path) -> None:
    tasks = tmp_path / "broken_tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text(
        "task: evalq_broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: /nonexistent/data.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    await worker_factory(task_paths=[str(tasks)])
    accepted = await client.submit(model="dummy", tasks=["evalq_broken"])
    events = await follow(client, accepted.job_id)
    assert isinstance(events[-1], Failed)
    assert events[-1].log_tail
    assert kinds(events).count("started") == 1


async def test_cancel_a_running_job_ends_its_process_group(
    client: AsyncClient, worker_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = await worker_factory(evaluator=FAKE, cancel_grace=2.0)
    monkeypatch.setenv("FAKE_EVAL_MODE", "slow")
    accepted = await client.submit(**JOB)
    pids: list[int] = []

    async def on_event(event: Any) -> None:
        if isinstance(event, ProgressEvent) and not pids:
            current = handle.worker.current
            assert current is not None and current.process is not None
            pids.append(current.process.pid)
            reply = await client.cancel_job(accepted.job_id)
            assert reply.status == "cancelling"

    events = await follow(client, accepted.job_id, timeout=60, on_event=on_event)
    cancelled = events[-1]
    assert isinstance(cancelled, Cancelled)
    assert cancelled.cancel_latency_s is not None and cancelled.cancel_latency_s >= 0
    assert (pids and not psutil.pid_exists(pids[0])) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)
    info = await client.get_job(accepted.job_id)
    assert info.status == "cancelled"


async def test_cancel_a_running_lmms_eval_job(client: AsyncClient, worker_factory: Any) -> None:
    handle = await worker_factory()
    accepted = await client.submit(**JOB)
    pids: list[int] = []

    async def on_event(event: Any) -> None:
        if isinstance(event, Started):
            current = handle.worker.current
            assert current is not None and current.process is not None
            pids.append(current.process.pid)
            await client.cancel_job(accepted.job_id)

    events = await follow(client, accepted.job_id, timeout=60, on_event=on_event)
    assert isinstance(events[-1], Cancelled)
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)


async def test_worker_killed_mid_job_is_redelivered(
    client: AsyncClient, settings: Settings, processes: Processes
) -> None:
    first = processes.worker(settings)
    accepted = await client.submit(**JOB)
    children: list[int] = []

    async def on_event(event: Any) -> None:
        if isinstance(event, Started) and event.attempt == 1:
            children.extend(c.pid for c in psutil.Process(first.pid).children(recursive=True))
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            processes.worker(settings)

    events = await follow(client, accepted.job_id, timeout=240, on_event=on_event)
    order = kinds(events)
    assert order[-1] == "completed"
    assert order.count("completed") == 1
    requeued = [e for e in events if isinstance(e, Requeued)]
    assert requeued and requeued[0].attempt == 2
    started = [e for e in events if isinstance(e, Started)]
    assert [s.attempt for s in started] == [1, 2]
    assert started[0].worker != started[1].worker
    info = await client.get_job(accepted.job_id)
    assert info.attempts == 2 and info.status == "completed"
    # The killed worker's evaluation died with it (it would hold a GPU otherwise).
    assert children and all(not psutil.pid_exists(p) for p in children)
    stored = await all_events(client, accepted.job_id)
    assert kinds(stored).count("completed") == 1


async def test_poison_job_fails_after_max_attempts(
    client: AsyncClient, settings: Settings, processes: Processes
) -> None:
    extra = {
        "EVALQ_EVALUATOR": " ".join(FAKE),
        "FAKE_EVAL_MODE": "poison",
        "EVALQ_MAX_ATTEMPTS": "2",
        "EVALQ_ACK_WAIT": "2",
    }
    poisoned = settings.with_(ack_wait=2.0)
    accepted = await client.submit(**JOB)
    # Each worker that takes the job dies; a new one replaces it, up to a bound.
    info = await client.get_job(accepted.job_id)
    for _ in range(5):
        if info.status == "failed":
            break
        worker = processes.worker(poisoned, **extra)
        info = await eventually(
            lambda: client.get_job(accepted.job_id),
            until=lambda i, w=worker: i.status == "failed" or w.poll() is not None,
            timeout=60,
            what="the job failed, or its worker died",
        )
    assert info.status == "failed"
    assert info.error is not None and "2 attempts" in info.error
    stored = await all_events(client, accepted.job_id)
    assert kinds(stored).count("failed") == 1


async def test_two_workers_share_six_jobs_one_at_a_time(client: AsyncClient, worker_factory: Any) -> None:
    await worker_factory()
    await worker_factory()
    ids = [(await client.submit(**JOB, limit=2)).job_id for _ in range(6)]
    finals = await asyncio.wait_for(asyncio.gather(*(client.wait_for_job(j) for j in ids)), 400)
    outcomes = [(info.status, info.attempts) for info in finals]
    assert outcomes == [("completed", 1)] * 6
    spans: dict[str, list[tuple[str, str]]] = {}
    for job in ids:
        events = await all_events(client, job)
        started = [e for e in events if isinstance(e, Started)]
        assert len(started) == 1, "a job ran twice"
        done = next(e for e in events if isinstance(e, Completed))
        spans.setdefault(started[0].worker or "", []).append((started[0].time, done.time))
    assert len(spans) == 2, "both workers should have run jobs"
    for worker_spans in spans.values():
        ordered = sorted(worker_spans)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered)), "a worker ran two jobs at once"


@pytest.mark.parametrize("mode", ["finish", "requeue"])
async def test_sigterm_finishes_or_hands_back(
    client: AsyncClient, settings: Settings, processes: Processes, mode: str
) -> None:
    first = processes.worker(settings, EVALQ_SHUTDOWN_MODE=mode, EVALQ_GRACE="120")
    accepted = await client.submit(**JOB, limit=4)

    async def on_event(event: Any) -> None:
        if isinstance(event, Started) and event.attempt == 1:
            os.kill(first.pid, signal.SIGTERM)
            if mode == "requeue":
                code = await asyncio.wait_for(asyncio.to_thread(first.wait), 60)
                assert code == 0
                processes.worker(settings)

    events = await follow(client, accepted.job_id, timeout=240, on_event=on_event)
    assert isinstance(events[-1], Completed)
    if mode == "finish":
        assert [e.attempt for e in events if isinstance(e, Started)] == [1]
        assert await asyncio.wait_for(asyncio.to_thread(first.wait), 60) == 0
    else:
        requeued = [e for e in events if isinstance(e, Requeued)]
        assert requeued and "shutting down" in requeued[0].reason
        assert [e.attempt for e in events if isinstance(e, Started)] == [1, 2]


async def test_a_terminal_record_without_its_event_gets_the_event(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology
) -> None:
    # A gateway whose cancel event met a dead node leaves this behind: the record says
    # cancelled, the work message is still in the stream, and no terminal event exists.
    # A listed idle worker that never fetches gets the job admitted into the work stream.
    idle = WorkerInfo(worker_id="w-idle", host="h", pid=1, ttl=60.0)
    await (await nc.jetstream().key_value(topology.workers_bucket)).put(idle.worker_id, encode(idle))
    accepted = await client.submit(**JOB)
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))

    async def admitted() -> bool:
        found = await jobs.get(accepted.job_id)
        return found is not None and found[0].admitted_at is not None

    await eventually(admitted, what="the job admitted", timeout=10)
    await jobs.transition(
        accepted.job_id,
        lambda info: msgspec.structs.replace(info, status="cancelled", error="cancelled while queued"),
    )
    await worker_factory(evaluator=FAKE)
    events = await follow(client, accepted.job_id, timeout=60)
    assert kinds(events) == ["queued", "cancelled"]
    cancelled = events[-1]
    assert isinstance(cancelled, Cancelled) and cancelled.reason == "cancelled while queued"
    js = nc.jetstream()
    for _ in range(100):  # the ack follows the event; bounded wait for it
        consumer = await js.consumer_info(topology.work_stream("default"), topology.consumer)
        if consumer.num_pending == 0 and consumer.num_ack_pending == 0:
            break
        await asyncio.sleep(0.1)
    assert consumer.num_pending == 0 and consumer.num_ack_pending == 0


async def test_a_missing_queued_event_is_published_before_started(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology
) -> None:
    # The gateway writes the queued event and the record side by side; a gateway that died
    # as it wrote them can leave a record and a work message with no `queued` event.
    job_id = str(uuid.uuid4())
    request = EvaluateRequest(model="dummy", tasks=["evalq_demo"])
    created = now()
    js = nc.jetstream()
    ack = await js.publish(
        topology.work_subject("default", job_id),
        encode(WorkItem(job_id=job_id, request=request, created_at=created)),
        stream=topology.work_stream("default"),
    )
    jobs = JobStore(await js.key_value(topology.jobs_bucket))
    info = JobInfo(job_id=job_id, status="queued", created_at=created, request=request, stream_seq=ack.seq)
    await jobs.create(info)
    await worker_factory(evaluator=FAKE)
    events = await follow(client, job_id, timeout=60)
    order = kinds(events)
    assert order[:2] == ["queued", "started"] and order[-1] == "completed"
    assert order.count("queued") == 1
    queued = events[0]
    assert isinstance(queued, Queued) and queued.stream_seq == ack.seq


async def test_a_terminal_record_written_under_a_running_job_still_gets_its_event(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology
) -> None:
    # A write that timed out may in fact have landed: the worker then finds the record
    # terminal already when it records the outcome, and must still see to the event.
    await worker_factory(evaluator=FAKE)
    accepted = await client.submit(**JOB, limit=40)
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))

    async def on_event(event: Any) -> None:
        if isinstance(event, Started):
            await jobs.transition(
                accepted.job_id,
                lambda info: msgspec.structs.replace(info, status="completed", completed_at=now()),
            )

    events = await follow(client, accepted.job_id, timeout=60, on_event=on_event)
    assert kinds(events)[-1] == "completed"
    stored = await all_events(client, accepted.job_id)
    assert kinds(stored).count("completed") == 1
    js = nc.jetstream()
    for _ in range(100):  # the ack follows the event; bounded wait for it
        consumer = await js.consumer_info(topology.work_stream("default"), topology.consumer)
        if consumer.num_ack_pending == 0:
            break
        await asyncio.sleep(0.1)
    assert consumer.num_ack_pending == 0
