"""Fault injection with real processes on loopback; each test bounded and stopping by itself."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from evalq import AsyncClient, JobCancelled, JobFailed
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.jobstore import JobStore
from evalq.schemas import TERMINAL, Completed, ShardCompleted, ShardStarted, Started
from evalq.topology import Topology
from evalq.worker import Worker
from evalq.worker.resident import ResidentJob

from ..conftest import EVALQ, Processes, Workers, settings_env
from ..events import all_events, follow, job_history, kinds
from ..jobs import FAKE, JOB, STAND_IN, submit_until_accepted
from ..waiting import eventually
from .conftest import figure

pytestmark = pytest.mark.chaos


async def stream_count(settings: Settings, pool: str = "default") -> int:
    nc = await connect(settings)
    try:
        topology = Topology.from_settings(settings)
        # Each enqueued job is a record in the jobs bucket (the queue).
        return (await nc.jetstream().stream_info(f"KV_{topology.jobs_bucket}")).state.messages
    finally:
        await nc.close()


async def drain(settings: Settings, ids: list[str], workers: int = 2, timeout: float = 240) -> dict[str, str]:
    """Run `workers` stand-in workers until every job is terminal; returns job -> status."""
    async with Workers(settings) as running, AsyncClient(settings) as client:
        for _ in range(workers):
            await running.start(evaluator=[STAND_IN])
        deadline = time.monotonic() + timeout
        statuses: dict[str, str] = {}
        for job in ids:
            try:
                info = await client.wait_for_job(job, timeout=max(1.0, deadline - time.monotonic()))
                statuses[job] = info.status
            except (JobFailed, JobCancelled) as exc:
                statuses[job] = "failed" if isinstance(exc, JobFailed) else "cancelled"
        return statuses


async def test_nats_server_killed_during_a_burst_of_500(own_server: EmbeddedServer, own_settings: Settings) -> None:
    total = 500
    gateway_nc = await connect(own_settings)
    await Topology.from_settings(own_settings).ensure(gateway_nc.jetstream())
    gateway = await Gateway(gateway_nc, own_settings).start()
    accepted: dict[str, str] = {}
    killed = asyncio.Event()
    try:
        async with AsyncClient(own_settings, timeout=2.0) as client:
            deadline = time.monotonic() + 120
            slots = asyncio.Semaphore(64)

            async def one(index: int) -> None:
                async with slots:
                    accepted[f"burst-{index}"] = await submit_until_accepted(client, f"burst-{index}", deadline)
                if len(accepted) >= total // 3 and not killed.is_set():
                    killed.set()
                    own_server.kill()  # kill -9, mid-burst
                    own_server.start()  # same port, same store

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), 180)
        assert killed.is_set()
        ids = list(accepted.values())
        stored = await stream_count(own_settings)
        duplicated = stored - len(set(ids))
        statuses = await drain(own_settings, ids)
        completed = sum(s == "completed" for s in statuses.values())
    finally:
        await gateway.stop()
        await gateway_nc.close()
    figure(
        "nats-server kill -9 during burst",
        submitted=total,
        accepted=len(ids),
        completed=completed,
        lost=len(ids) - completed,
        duplicated=duplicated,
    )
    assert len(set(ids)) == total
    assert duplicated == 0
    assert completed == total


async def _service_instances(nc: Any, name: str) -> int:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.PING.{name}", b"", reply=inbox)
    count = 0
    try:
        while True:
            await sub.next_msg(timeout=0.5)
            count += 1
    except Exception:
        pass
    finally:
        await sub.unsubscribe()
    return count


async def test_gateway_killed_under_load(settings: Settings, nc: Any, topology: Topology, processes: Processes) -> None:
    total = 300
    env = settings_env(settings)
    first = processes.start([*EVALQ, "gateway"], env, name="gateway")
    processes.start([*EVALQ, "gateway"], env, name="gateway")
    # Each try listens half a second for the gateways' answers: no pause is needed between them.
    await eventually(
        lambda: _service_instances(nc, topology.service_name),
        until=lambda count: count >= 2,
        timeout=60,
        what="both gateways to answer a service ping",
        interval=0,
    )
    accepted: dict[str, str] = {}
    async with AsyncClient(settings, timeout=2.0) as client:
        slots = asyncio.Semaphore(16)
        stop_by = time.monotonic() + 120

        async def one(index: int) -> None:
            async with slots:
                accepted[str(index)] = await submit_until_accepted(client, f"gw-{index}", stop_by)
            if len(accepted) == total // 3:
                os.kill(first.pid, signal.SIGKILL)

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), 150)
    assert first.wait(10) == -signal.SIGKILL
    stored = (await nc.jetstream().stream_info(f"KV_{topology.jobs_bucket}")).state.messages
    ids = set(accepted.values())
    figure(
        "gateway kill -9 under load",
        submitted=total,
        accepted=len(ids),
        lost=total - stored if stored <= total else 0,
        duplicated=max(0, stored - len(ids)),
    )
    assert len(ids) == total
    assert stored == total


async def test_worker_killed_during_upload(
    settings: Settings, nc: Any, client: AsyncClient, processes: Processes, tmp_path: Path
) -> None:
    big = settings_env(
        settings,
        EVALQ_EVALUATOR=" ".join(FAKE),
        FAKE_EVAL_MODE="big",
    )
    first = processes.start([*EVALQ, "worker"], big, name="worker")
    accepted = await client.submit(**JOB, limit=2)
    # The first chunk of the job's results in the object store: the worker is uploading.
    chunks = await nc.subscribe(f"$O.{settings.queue.prefix}-results.C.>")
    await chunks.next_msg(timeout=120)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    await chunks.unsubscribe()
    processes.start([*EVALQ, "worker"], big, name="worker")
    info = await client.wait_for_job(accepted.job_id, timeout=180)
    events = await all_events(client, accepted.job_id)
    figure(
        "worker kill -9 during upload",
        jobs=1,
        completed=int(info.status == "completed"),
        terminal_events=sum(k in ("completed", "failed", "cancelled") for k in kinds(events)),
        attempts=info.attempts,
    )
    assert info.status == "completed" and info.attempts == 2
    assert kinds(events).count("completed") == 1
    assert sum(k in ("failed", "cancelled") for k in kinds(events)) == 0


@pytest.mark.slow
async def test_nats_restart_while_lmms_eval_runs(own_server: EmbeddedServer, own_settings: Settings) -> None:
    settings = own_settings.with_(ack_wait=60.0)
    gateway_nc = await connect(settings)
    await Topology.from_settings(settings).ensure(gateway_nc.jetstream())
    gateway = await Gateway(gateway_nc, settings).start()
    worker_nc = await connect(settings)
    worker = await Worker(worker_nc, settings).start()
    running = asyncio.create_task(worker.run())
    try:
        async with AsyncClient(settings) as client:
            accepted = await client.submit(**JOB)
            started = asyncio.Event()

            async def on_event(event: Any) -> None:
                if isinstance(event, Started):
                    started.set()
                    raise asyncio.CancelledError  # stop following: the server goes away now

            with pytest.raises(asyncio.CancelledError):
                await follow(client, accepted.job_id, timeout=60, on_event=on_event)
        assert worker.current is not None and worker.current.process is not None
        process = worker.current.process
        pid = process.pid
        own_server.stop()
        outage_began = time.monotonic()
        await asyncio.sleep(10)  # the outage itself, not a wait for anything
        own_server.start()
        async with AsyncClient(settings) as client:
            info = await client.wait_for_job(accepted.job_id, timeout=180)
            assert info.status == "completed" and info.attempts == 1
            assert info.result is not None and info.result.metrics["evalq_demo"]["exact_match"] == pytest.approx(0.6)
            events = await all_events(client, accepted.job_id)
            assert [e.attempt for e in events if isinstance(e, Started)] == [1]
            assert isinstance(events[-1], Completed)
            if isinstance(process, ResidentJob):
                # The job ended; the process that ran it lives on, holding the model for the next.
                assert not process._running() and worker.resident is not None and worker.resident.alive
            else:
                assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

            # Its entry expired in the outage; its next heartbeat lists it again.
            async def listed() -> list[str]:
                return [w.worker_id for w in (await client.health()).workers]

            workers = await eventually(listed, timeout=10 * settings.worker.heartbeat, what="the worker listed again")
            assert workers == [worker.worker_id]
        figure(
            "nats-server stopped 10 s mid-job",
            jobs=1,
            completed=1,
            lost=0,
            duplicated=0,
            outage_s=int(time.monotonic() - outage_began),
        )
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 60)
        await worker.stop()
        await worker_nc.close()
        await gateway.stop()
        await gateway_nc.close()


async def test_store_full_gives_an_error_never_a_false_accept(tmp_path: Path, settings: Settings) -> None:
    config = tmp_path / "small.conf"
    config.write_text("jetstream { max_file_store: 2MB, max_memory_store: 1MB }\n")
    server = EmbeddedServer(tmp_path / "small-store", config_file=config)
    server.start()
    try:
        small = settings.with_(nats_url=[server.url])
        nc = await connect(small)
        await Topology.from_settings(small).ensure(nc.jetstream())
        accepted, refused, codes = 0, 0, collections.Counter[int]()
        async with Gateway(nc, small), AsyncClient(small) as client:
            labels = {f"k{i}": "x" * 250 for i in range(32)}
            for _ in range(2000):
                try:
                    await client.submit(**JOB, labels=labels, retries=0)
                    accepted += 1
                except Exception as exc:
                    refused += 1
                    codes[getattr(exc, "code", 0)] += 1
                    if refused >= 5:
                        break
            stored = (
                await nc.jetstream().stream_info(f"KV_{Topology.from_settings(small).jobs_bucket}")
            ).state.messages
        await nc.close()
    finally:
        server.stop()
    figure("store full", submitted=accepted + refused, accepted=accepted, refused=refused, stored=stored)
    assert refused >= 5, "the store never filled"
    assert set(codes) == {503}, codes
    assert stored == accepted


async def test_2000_jobs_with_random_cancels_and_two_workers(settings: Settings, nc: Any, client: AsyncClient) -> None:
    total = 2000
    rng = random.Random(7)
    ids: list[str] = []
    slots = asyncio.Semaphore(64)

    async def one() -> None:
        async with slots:
            ids.append((await client.submit(**JOB, limit=1)).job_id)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(total))), 120)
    chosen = rng.sample(ids, total // 5)
    cancel_replies = collections.Counter[str]()
    jobs = JobStore(await nc.jetstream().key_value(Topology.from_settings(settings).jobs_bucket))
    deadline = time.monotonic() + 300  # from the workers' start: the cancels below take part of it
    statuses: dict[str, str] = {}

    async def all_ended() -> bool:
        for job in ids:
            if job not in statuses:
                found = await jobs.get(job)
                if found and found[0].status in TERMINAL:
                    statuses[job] = found[0].status
        return len(statuses) == total

    async with Workers(settings) as workers:
        for _ in range(2):
            await workers.start(evaluator=[STAND_IN], progress_interval=60.0)
        for job in chosen:
            try:
                cancel_replies[(await client.cancel_job(job)).status] += 1
            except Exception as exc:  # 409: it finished before the cancel arrived
                cancel_replies[type(exc).__name__] += 1
        await eventually(
            all_ended,
            timeout=deadline - time.monotonic(),
            what=lambda: f"every job to end ({total - len(statuses)} not finished)",
            interval=0.5,
        )
    topology = Topology.from_settings(settings)
    history = await job_history(settings)
    terminal_events = collections.Counter(
        {job: sum(type(e).__struct_config__.tag in TERMINAL for e in events) for job, events in history.items()}  # type: ignore[attr-defined]
    )
    counts = collections.Counter(statuses.values())
    left = (await nc.jetstream().stream_info(topology.work_stream("default"))).state.messages
    figure(
        "2000 jobs, random cancels, two workers",
        submitted=total,
        completed=counts["completed"],
        cancelled=counts["cancelled"],
        failed=counts["failed"],
        left_in_queue=left,
        duplicated=sum(n - 1 for n in terminal_events.values() if n > 1),
    )
    assert len(statuses) == total
    assert counts["completed"] + counts["cancelled"] == total and counts["failed"] == 0
    assert counts["cancelled"] >= 1
    assert all(terminal_events[job] == 1 for job in ids), "a job has more or less than one terminal event"
    assert left == 0


async def test_a_sharded_job_resumes_across_a_nats_and_gateway_restart(
    own_server: EmbeddedServer, own_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces that finished before nats-server and the gateway went away are never run again."""
    settings = own_settings.with_(ack_wait=60.0)
    gateway_nc = await connect(settings)
    await Topology.from_settings(settings).ensure(gateway_nc.jetstream())
    gateway = await Gateway(gateway_nc, settings).start()
    monkeypatch.setenv("FAKE_PIECE_SECONDS", "1.5")
    try:
        async with Workers(settings) as running:
            for _ in range(2):
                await running.start(evaluator=FAKE)
            async with AsyncClient(settings) as client:
                accepted = await client.submit(model="dummy", tasks=["fake"], limit=60, shards=6)
                first_done = asyncio.Event()

                async def on_event(event: Any) -> None:
                    if isinstance(event, ShardCompleted):
                        first_done.set()
                        raise asyncio.CancelledError  # stop following: the server goes away now

                with pytest.raises(asyncio.CancelledError):
                    await follow(client, accepted.job_id, timeout=60, on_event=on_event)
            await gateway.stop()
            await gateway_nc.close()
            own_server.stop()
            await asyncio.sleep(5)  # the outage itself, not a wait for anything
            own_server.start()
            gateway_nc = await connect(settings)
            gateway = await Gateway(gateway_nc, settings).start()
            async with AsyncClient(settings) as client:
                info = await client.wait_for_job(accepted.job_id, timeout=180)
                events = await all_events(client, accepted.job_id)
    finally:
        await gateway.stop()
        await gateway_nc.close()
    assert info.status == "completed" and (info.shards, info.shards_done) == (6, 6)
    starts = collections.Counter(e.shard for e in events if isinstance(e, ShardStarted))
    assert starts == {index: 1 for index in range(6)}, f"a piece ran twice: {starts}"
    assert kinds(events).count("completed") == 1
    figure("nats-server and gateway restarted mid sharded job", pieces=6, completed=6, rerun=0)
