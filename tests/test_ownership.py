"""Shared settings have one owner, and recovery is quick: processes that start with other
values change nothing under running jobs, and a killed worker's job restarts elsewhere soon."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient, InvalidField
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.schemas import Requeued, Started
from evalq.topology import Topology

from .conftest import Processes
from .events import all_events, follow, kinds
from .jobs import FAKE, JOB
from .waiting import eventually

pytestmark = pytest.mark.slow


async def test_workers_with_other_settings_and_a_gateway_on_defaults_change_nothing(
    settings: Settings, topology: Topology, client: AsyncClient, worker_factory: Any, nc: Any
) -> None:
    # The queue was created with ack_wait 5 s. This worker would renew a job every 10 s (its
    # own 30 s / 3) and list itself every 4 s: both must follow what the queue says instead.
    slow_beat = await worker_factory(evaluator=FAKE, heartbeat=4.0, ack_wait=30.0)
    accepted = await client.submit(**{**JOB, "limit": 240})  # about 12 s in the stand-in
    started = time.monotonic()

    async def running() -> bool:
        return (await client.get_job(accepted.job_id)).status == "running"

    await eventually(running, timeout=60, what="the job to start")

    # Then a worker with a 1 s heartbeat and a gateway on every default start beside it.
    fast_beat = await worker_factory(evaluator=FAKE, heartbeat=1.0, ack_wait=5.0)
    defaults = Settings.of(
        nats_url=settings.connection.nats_url,
        prefix=settings.queue.prefix,
        home=settings.home,
        handle_signals=False,
    )
    gateway_nc = await connect(defaults, name="gateway-on-defaults")
    seen: list[set[str]] = []
    try:
        async with Gateway(gateway_nc, defaults):
            # A sample each 0.25 s while it runs: every one is checked, so this stays a loop.
            while await running():
                assert time.monotonic() < started + 60, "the job never finished"
                # Health comes from a gateway's registry, which follows the bucket: a request
                # that times out is a failure, never a sample to skip.
                seen.append({w.worker_id for w in (await client.health()).workers})
                await asyncio.sleep(0.25)
    finally:
        await gateway_nc.close()

    both = {slow_beat.worker.worker_id, fast_beat.worker.worker_id}
    assert len(seen) >= 12 / 0.25 * 0.5, "watched for fewer than three of the slow heartbeats"
    missing = [both - keys for keys in seen if not both <= keys]
    assert not missing, f"a worker's registration expired between its heartbeats: {missing}"
    info = await client.get_job(accepted.job_id)
    assert (info.status, info.attempts) == ("completed", 1)
    events = await all_events(client, accepted.job_id)
    assert kinds(events).count("started") == 1 and not any(isinstance(e, Requeued) for e in events)
    js = nc.jetstream()
    consumer = await js.consumer_info(topology.work_stream("default"), topology.consumer)
    assert consumer.config.ack_wait == settings.queue.ack_wait == 5.0, "a process rewrote the queue's ack_wait"
    workers_stream = (await js.stream_info(f"KV_{topology.workers_bucket}")).config
    assert not workers_stream.max_age and workers_stream.allow_msg_ttl


async def test_a_killed_workers_job_restarts_elsewhere_within_20_s(
    nats_server: EmbeddedServer, tmp_path: Path, processes: Processes
) -> None:
    # The queue's defaults, as a deployment gets them (the other tests shorten ack_wait).
    settings = Settings.of(
        nats_url=[nats_server.url],
        prefix=f"t{uuid.uuid4().hex[:10]}",
        home=str(tmp_path / "home"),
        handle_signals=False,
        advertise_inventory=False,
    )
    assert settings.queue.ack_wait == 12.0
    nc = await connect(settings, name="test")
    await Topology.from_settings(settings).ensure(nc.jetstream())
    env = {"EVALQ_EVALUATOR": " ".join(FAKE), "FAKE_EVAL_MODE": "slow"}
    workers = {name: processes.worker(settings, EVALQ_WORKER_ID=name, **env) for name in ("w-one", "w-two")}
    killed_at: list[float] = []
    restarted_at: list[float] = []
    try:
        async with Gateway(nc, settings), AsyncClient(settings) as client:
            accepted = await client.submit(**JOB)

            async def on_event(event: Any) -> None:
                if isinstance(event, Started) and event.attempt == 1 and not killed_at:
                    victim = workers[event.worker or ""]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at.append(time.monotonic())
                elif isinstance(event, Started) and event.attempt == 2:
                    restarted_at.append(time.monotonic())
                    await client.cancel_job(accepted.job_id)

            events = await follow(client, accepted.job_id, timeout=120, on_event=on_event)
    finally:
        await nc.close()
    assert killed_at and restarted_at, kinds(events)
    started = [e for e in events if isinstance(e, Started)]
    assert started[0].worker != started[1].worker
    assert restarted_at[0] - killed_at[0] <= 20.0, f"restarted {restarted_at[0] - killed_at[0]:.1f} s after the kill"
    assert kinds(events)[-1] == "cancelled"


async def test_a_worker_is_listed_only_with_its_inventory(client: AsyncClient, worker_factory: Any) -> None:
    """`health` never shows a worker whose tasks are unknown, so `tasks` never answers [] beside it."""
    handle = await worker_factory(advertise_inventory=True)
    looks = 0

    async def listed() -> list[Any]:
        nonlocal looks
        # Tasks first: a worker listed between the two answers is then in both, never in the
        # tasks alone (the other order would see one listed between them as a violation).
        tasks = await client.list_tasks()
        workers = (await client.health()).workers
        looks += 1
        # Every look is checked: until health shows the worker, tasks must say nothing.
        assert workers or tasks == [], "tasks came from a worker that health does not show"
        return workers

    # The warm evaluator's imports, on 2 shared cores.
    workers = await eventually(listed, timeout=240, interval=0.2, what="the worker listed with its inventory")
    assert [w.worker_id for w in workers] == [handle.worker.worker_id]
    assert workers[0].tasks and "evalq_demo" in workers[0].tasks
    assert "evalq_demo" in await client.list_tasks() and "dummy" in await client.list_models()
    assert looks > 1, "listed before its inventory could have been taken"
    # A job for a task no worker lists is refused once one is listed.
    with pytest.raises(InvalidField, match="unknown task"):
        await client.submit(**{**JOB, "tasks": ["no_such_task"]})
