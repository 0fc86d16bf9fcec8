"""Changing the consumer's `ack_wait` under running jobs: a lower value reaches every worker
that holds a message before the server applies it, so no live worker's job is redelivered;
a worker that cannot confirm stops the change; a higher value needs no one's consent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.schemas import Requeued, Started, WorkerInfo, encode, now
from evalq.topology import LOWERING, Topology

from .conftest import EVALQ, Workers, run_command, settings_env
from .events import all_events, kinds
from .jobs import FAKE, JOB
from .test_auth import PASSWORDS, accounts_server, as_user
from .waiting import eventually

pytestmark = pytest.mark.slow

# About 12 s in the stand-in (0.05 s a document): long enough for a 2 s ack_wait to lapse
# several times over while it runs.
LONG_JOB = {**JOB, "limit": 240}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A queue made with a long ack_wait, as a deployment that later wants it shorter has.
    return settings.with_(ack_wait=30.0)


async def evalq(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    return await run_command([*EVALQ, *args], settings_env(settings, **env), timeout=120)


async def ack_waits(nc: Any, topology: Topology) -> set[float]:
    js = nc.jetstream()
    streams = (topology.work_stream("default"), topology.pieces_stream("default"))
    return {(await js.consumer_info(stream, topology.consumer)).config.ack_wait for stream in streams}


async def running(client: AsyncClient, job_id: str) -> bool:
    return (await client.get_job(job_id)).status == "running"


async def test_lowering_ack_wait_under_a_running_job_runs_it_once(
    settings: Settings, topology: Topology, client: AsyncClient, worker_factory: Any, nc: Any
) -> None:
    first = await worker_factory(evaluator=FAKE)
    second = await worker_factory(evaluator=FAKE)
    accepted = await client.submit(**LONG_JOB)
    await eventually(lambda: running(client, accepted.job_id), timeout=60, what="the job started")

    code, out, err = await evalq(settings, "setup", "--ack-wait", "2")
    changed_at = time.monotonic()
    assert code == 0, err
    assert "ack_wait changed from 30.0 to 2.0" in out
    assert await running(client, accepted.job_id), "the job ended before the change: nothing was shown"
    assert await ack_waits(nc, topology) == {2.0}

    info = await client.wait_for_job(accepted.job_id, timeout=120)
    # The job outlived the new ack_wait twice over, so a worker renewing at the old pace
    # would have lost it.
    assert time.monotonic() - changed_at > 2 * 2.0
    events = await all_events(client, accepted.job_id)
    started = [e for e in events if isinstance(e, Started)]
    assert not [e for e in events if isinstance(e, Requeued)], kinds(events)
    assert len(started) == 1, kinds(events)
    assert started[0].attempt == 1
    assert (info.status, info.attempts, info.worker) == ("completed", 1, started[0].worker)
    assert info.worker in {first.worker.worker_id, second.worker.worker_id}
    assert await ack_waits(nc, topology) == {2.0}


async def test_setup_refuses_to_lower_what_a_running_worker_does_not_confirm(
    settings: Settings, topology: Topology, nc: Any, worker_factory: Any
) -> None:
    # A live, idle worker answers; the entry of one that is gone still names its job.
    await worker_factory(evaluator=FAKE)
    ghost = WorkerInfo(
        worker_id="w-gone", host="elsewhere", pid=1, pool="default", current_job="job-of-the-gone", ttl=120.0
    )
    kv = await nc.jetstream().key_value(topology.workers_bucket)
    await kv.put(ghost.worker_id, encode(msgspec.structs.replace(ghost, heartbeat_at=now())))
    quick = {"EVALQ_REQUEST_TIMEOUT": "2"}  # the bound on the answers

    code, out, err = await evalq(settings, "setup", "--ack-wait", "2", **quick)
    assert code == 1, (out, err)
    assert "w-gone" in err and "job-of-the-gone" in err and "--force" in err
    assert await ack_waits(nc, topology) == {30.0}, "a refused setup changed the consumer"
    consumer = await nc.jetstream().consumer_info(topology.work_stream("default"), topology.consumer)
    assert LOWERING not in (consumer.config.metadata or {}), "a refused setup left its mark"

    # Raising asks no one: the gone worker's job is only kept longer.
    code, out, err = await evalq(settings, "setup", "--ack-wait", "60", **quick)
    assert code == 0, err
    assert "ack_wait changed from 30.0 to 60.0" in out
    assert await ack_waits(nc, topology) == {60.0}

    code, out, err = await evalq(settings, "setup", "--ack-wait", "2", "--force", **quick)
    assert code == 0, err
    assert "ack_wait changed from 60.0 to 2.0" in out and "w-gone" in err
    assert await ack_waits(nc, topology) == {2.0}


async def test_a_worker_renews_for_the_lower_value_a_setup_in_flight_has_marked(
    topology: Topology, client: AsyncClient, worker_factory: Any, nc: Any
) -> None:
    # A job taken after setup marked the consumer, but before its announcement reached the
    # worker, is kept alive for the value about to be applied.
    handle = await worker_factory(evaluator=FAKE)
    assert handle.worker.ack_wait == 30.0
    js = nc.jetstream()
    await topology.mark_lowering(js, "default", 2.0)
    accepted = await client.submit(**LONG_JOB)
    await eventually(lambda: running(client, accepted.job_id), timeout=60, what="the job started")
    await eventually(lambda: handle.worker.ack_wait == 2.0, timeout=10, what="the worker read the mark")

    # A setup that gave up takes the mark back; the worker returns to the consumer's value at
    # its next renewal, a change made by other means included.
    await topology.mark_lowering(js, "default", None)
    await eventually(lambda: handle.worker.ack_wait == 30.0, timeout=10, what="the worker read the mark's removal")
    await Topology(prefix=topology.prefix, ack_wait=20.0).ensure(js, update=True)
    await eventually(lambda: handle.worker.ack_wait == 20.0, timeout=15, what="the worker followed the consumer")

    info = await client.wait_for_job(accepted.job_id, timeout=120)
    events = await all_events(client, accepted.job_id)
    assert (info.status, info.attempts) == ("completed", 1)
    assert not [e for e in events if isinstance(e, Requeued)], kinds(events)


@pytest.fixture
def shipped_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A nats-server with deploy/nats/accounts.conf as it is committed."""
    with accounts_server(tmp_path) as server:
        yield server


async def test_with_the_shipped_permissions_setup_lowers_it_as_the_gateway_user(
    shipped_server: EmbeddedServer, settings: Settings
) -> None:
    # `evalq setup` runs as the gateway user; the worker, as its own, hears and answers it.
    gateway_settings = as_user(settings, shipped_server, "gateway")
    worker_settings = as_user(settings, shipped_server, "worker")
    gateway_nc = await connect(gateway_settings)
    try:
        async with (
            Gateway(gateway_nc, gateway_settings),
            Workers(worker_settings) as workers,
            AsyncClient(as_user(settings, shipped_server, "submitter")) as client,
        ):
            # Two, so that a job given up by its worker would start again on the other.
            await workers.start(evaluator=FAKE)
            await workers.start(evaluator=FAKE)
            accepted = await client.submit(**LONG_JOB)
            await eventually(lambda: running(client, accepted.job_id), timeout=60, what="the job started")
            as_gateway = {
                "EVALQ_USER": "gateway",
                "EVALQ_PASSWORD": PASSWORDS["gateway"],
                "EVALQ_INBOX_PREFIX": "_INBOX_gateway",
            }
            code, out, err = await evalq(gateway_settings, "setup", "--ack-wait", "2", **as_gateway)
            assert code == 0, err
            assert "ack_wait changed from 30.0 to 2.0" in out
            assert await running(client, accepted.job_id)
            assert await ack_waits(gateway_nc, Topology()) == {2.0}
            info = await client.wait_for_job(accepted.job_id, timeout=120)
            assert (info.status, info.attempts) == ("completed", 1)
            events = [e async for e in client.watch(accepted.job_id)]
            assert kinds(events).count("started") == 1 and "requeued" not in kinds(events), kinds(events)
    finally:
        await gateway_nc.close()
