"""Scale-out on loopback: a 3-node JetStream cluster, many gateways and workers, pools,
and a rolling restart. Bounded in time; every process stops by itself or at teardown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient, JobCancelled, JobFailed
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.schemas import TERMINAL, Completed, Started
from evalq.topology import Topology
from evalq.worker import Worker

from .chaos.conftest import figure
from .conftest import RunningWorker, start_worker
from .events import job_history
from .jobs import JOB as BASE_JOB
from .jobs import STAND_IN, submit_until_accepted
from .waiting import eventually

# One document each: these tests count jobs through faults, they do not measure evaluations.
JOB = {**BASE_JOB, "limit": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        self.cluster_ports = [free_port() for _ in range(size)]
        self.servers: list[EmbeddedServer] = []
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.cluster_ports)
        for index in range(size):
            config = root / f"n{index}.conf"
            config.write_text(
                f"server_name: n{index}\n"
                f"cluster {{ name: evalq-test, listen: 127.0.0.1:{self.cluster_ports[index]}, routes: [{routes}] }}\n"
            )
            self.servers.append(EmbeddedServer(root / f"n{index}", port=free_port(), config_file=config))

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path)
    nodes.start()
    yield nodes
    nodes.stop()


class Site:
    """Gateways and workers on their own connections; all stopped at the end."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gateways: list[tuple[Gateway, Any]] = []
        self.workers: list[RunningWorker] = []

    async def add_gateway(self) -> Gateway:
        nc = await connect(self.settings)
        gateway = await Gateway(nc, self.settings).start()
        self.gateways.append((gateway, nc))
        return gateway

    async def add_worker(self, **overrides: Any) -> Worker:
        handle = await start_worker(self.settings, **overrides)
        self.workers.append(handle)
        return handle.worker

    async def stop_gateway(self, gateway: Gateway) -> None:
        for entry in list(self.gateways):
            if entry[0] is gateway:
                await gateway.stop()
                await entry[1].close()
                self.gateways.remove(entry)

    async def stop_worker(self, worker: Worker) -> None:
        for handle in list(self.workers):
            if handle.worker is worker:
                self.workers.remove(handle)
                await handle.stop()

    async def close(self) -> None:
        for handle in list(self.workers):
            with contextlib.suppress(Exception):
                await self.stop_worker(handle.worker)
        for gateway, _ in list(self.gateways):
            with contextlib.suppress(Exception):
                await self.stop_gateway(gateway)


@pytest.fixture
async def site_factory() -> AsyncIterator[Any]:
    sites: list[Site] = []

    def make(settings: Settings) -> Site:
        sites.append(Site(settings))
        return sites[-1]

    yield make
    for site in sites:
        await site.close()


async def final_status(client: AsyncClient, job: str, deadline: float) -> str:
    """The job's terminal status; an error in asking (a node is restarting) is asked again."""

    async def ended() -> str:
        try:
            return (await client.wait_for_job(job, timeout=max(1.0, deadline - time.monotonic()))).status
        except JobFailed:
            return "failed"
        except JobCancelled:
            return "cancelled"

    return await eventually(
        ended, timeout=deadline - time.monotonic(), what=f"job {job} to end", interval=0.5, retry_on=(Exception,)
    )


async def settled_history(settings: Settings, ids: list[str], deadline: float) -> dict[str, list[Any]]:
    """The event history once every job has its terminal event; read again while the restarted
    node catches up.

    A cancel whose event publish met the killed node leaves the work message in the stream, and
    the worker that takes it publishes the event; a job cancelled before it was admitted has no
    message, and a gateway's dispatcher publishes it. So a record can be terminal a moment
    before its event.
    """

    async def settled() -> dict[str, list[Any]]:
        history = await job_history(settings)
        unsettled = [job for job in ids if not any(type(e).__struct_config__.tag in TERMINAL for e in history[job])]  # type: ignore[attr-defined]
        assert not unsettled, f"{len(unsettled)} jobs have no terminal event, such as {unsettled[:3]}"
        return history

    return await eventually(
        settled,
        timeout=deadline - time.monotonic(),
        what="a terminal event of every job",
        interval=0.5,
        retry_on=(Exception,),
    )


def assert_one_job_at_a_time(history: dict[str, list[Any]]) -> collections.Counter[str]:
    spans: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for events in history.values():
        ends = [e for e in events if type(e).__struct_config__.tag in TERMINAL]  # type: ignore[attr-defined]
        if not ends or not isinstance(ends[-1], Completed):
            continue
        worker = ends[-1].worker or ""
        # A job redelivered during the outage may have started on two workers (at least once):
        # the span is the completing worker's own start to its end.
        starts = [e for e in events if isinstance(e, Started) and e.worker == ends[-1].worker]
        if starts:
            spans[worker].append((starts[-1].time, ends[-1].time))
    for worker, worker_spans in spans.items():
        ordered = sorted(worker_spans)
        for first, second in itertools.pairwise(ordered):
            assert first[1] <= second[0], f"worker {worker} ran two jobs at once"
    return collections.Counter({worker: len(s) for worker, s in spans.items()})


async def test_cluster_300_jobs_with_cancels_and_a_node_killed(
    cluster: Cluster, settings: Settings, site_factory: Any
) -> None:
    total = 300
    config = settings.with_(nats_url=cluster.urls, replicas=3, request_timeout=5.0, evaluator=[STAND_IN])
    nc = await connect(config)
    await Topology.from_settings(config).ensure(nc.jetstream(), timeout=60)
    stream = await nc.jetstream().stream_info(Topology.from_settings(config).work_stream("default"))
    assert stream.config.num_replicas == 3
    await nc.close()
    site: Site = site_factory(config)
    for _ in range(2):
        await site.add_gateway()
    for _ in range(3):
        await site.add_worker()

    rng = random.Random(11)
    deadline = time.monotonic() + 240
    async with AsyncClient(config, timeout=3.0) as client:
        slots = asyncio.Semaphore(32)
        ids: list[str] = []

        async def one(index: int) -> None:
            async with slots:
                ids.append(await submit_until_accepted(client, f"cluster-{index}", deadline, **JOB))

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), 120)
        cancels = rng.sample(ids, total // 5)
        for job in cancels[: len(cancels) // 2]:
            with contextlib.suppress(Exception):
                await client.cancel_job(job)
        victim = cluster.servers[1]
        victim.kill()  # kill -9 one node in the middle of the run
        for job in cancels[len(cancels) // 2 :]:
            with contextlib.suppress(Exception):
                await client.cancel_job(job)
        victim.start()
        statuses = collections.Counter([await final_status(client, job, deadline) for job in ids])
    history = await settled_history(config, ids, deadline)
    terminal_events = {job: sum(type(e).__struct_config__.tag in TERMINAL for e in history[job]) for job in ids}  # type: ignore[attr-defined]
    per_worker = assert_one_job_at_a_time(history)
    figure(
        "3-node cluster, 2 gateways, 3 workers, node killed",
        submitted=total,
        accepted=len(set(ids)),
        completed=statuses["completed"],
        cancelled=statuses["cancelled"],
        failed=statuses["failed"],
        duplicated=sum(n > 1 for n in terminal_events.values()),
    )
    assert len(set(ids)) == total
    assert statuses["completed"] + statuses["cancelled"] == total and statuses["failed"] == 0
    assert all(n == 1 for n in terminal_events.values())
    assert len(per_worker) == 3, f"work was not shared: {per_worker}"


@pytest.mark.slow
async def test_cluster_runs_a_real_lmms_eval_job(cluster: Cluster, settings: Settings, site_factory: Any) -> None:
    config = settings.with_(nats_url=cluster.urls, replicas=3, request_timeout=5.0)
    nc = await connect(config)
    await Topology.from_settings(config).ensure(nc.jetstream(), timeout=60)
    await nc.close()
    site: Site = site_factory(config)
    await site.add_gateway()
    await site.add_worker()
    async with AsyncClient(config) as client:
        info = await client.submit_and_wait(model="dummy", tasks=["evalq_demo"], timeout=180)
    assert info.result is not None
    assert info.result.metrics["evalq_demo"]["exact_match"] == pytest.approx(0.6)


async def test_pools_keep_their_jobs_and_positions(settings: Settings, site_factory: Any) -> None:
    site: Site = site_factory(settings.with_(evaluator=[STAND_IN]))
    await site.add_gateway()
    async with AsyncClient(settings) as client:
        with pytest.raises(Exception, match="known pools: default"):
            await client.submit(**JOB, pool="big")
        nc = await connect(settings)
        await Topology.from_settings(settings).ensure_pool(nc.jetstream(), "big")  # as `evalq worker --pool big` does
        await nc.close()
        big = [await client.submit(**JOB, pool="big") for _ in range(3)]
        small = [await client.submit(**JOB) for _ in range(2)]
        assert [a.position_in_queue for a in big] == [0, 1, 2]
        assert [a.position_in_queue for a in small] == [0, 1]
        queue = await client.queue()
        assert queue.queued_jobs == {"big": [a.job_id for a in big], "default": [a.job_id for a in small]}
        big_worker = await site.add_worker(pool="big")
        small_worker = await site.add_worker()
        for accepted in big + small:
            assert (await client.wait_for_job(accepted.job_id, timeout=60)).status == "completed"
        for accepted in big:
            assert (await client.get_job(accepted.job_id)).worker == big_worker.worker_id
        for accepted in small:
            assert (await client.get_job(accepted.job_id)).worker == small_worker.worker_id
        assert {w.pool for w in (await client.health()).workers} == {"big", "default"}


async def test_rolling_restart_loses_nothing(settings: Settings, site_factory: Any) -> None:
    total = 150
    config = settings.with_(evaluator=[STAND_IN], shutdown_mode="requeue")
    site: Site = site_factory(config)
    gateways = [await site.add_gateway() for _ in range(2)]
    workers = [await site.add_worker() for _ in range(2)]
    deadline = time.monotonic() + 180
    ids: list[str] = []
    async with AsyncClient(config, timeout=3.0) as client:

        async def load() -> None:
            for index in range(total):
                ids.append(await submit_until_accepted(client, f"roll-{index}", deadline, **JOB))

        loading = asyncio.create_task(load())
        for gateway in gateways:  # one by one, while the load goes on
            await site.stop_gateway(gateway)
            await site.add_gateway()
        for worker in workers:
            await site.stop_worker(worker)
            await site.add_worker()
        await asyncio.wait_for(loading, 150)
        statuses = collections.Counter([await final_status(client, job, deadline) for job in ids])
    history = await job_history(config)
    terminal = [sum(type(e).__struct_config__.tag in TERMINAL for e in history[job]) for job in ids]  # type: ignore[attr-defined]
    figure(
        "rolling restart",
        submitted=total,
        accepted=len(set(ids)),
        completed=statuses["completed"],
        duplicated=sum(n > 1 for n in terminal),
    )
    assert len(set(ids)) == total
    assert statuses["completed"] == total
    assert all(n == 1 for n in terminal)
