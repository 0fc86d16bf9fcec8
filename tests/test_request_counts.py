"""How many gateway requests the CLI and the SDK make, read from the gateway's own counters.

The gateway is a NATS micro service: `$SRV.STATS.<name>` answers each endpoint's
`num_requests`. The counts are exact, so a command that asks per job again fails here. A
follower reads stored events through the gateway (`read`) as they come, never on a clock:
its reads are bounded by the events stored, not by the time it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.errors import JobCancelled
from evalq.topology import Topology

from .conftest import EVALQ, settings_env
from .jobs import FAKE, JOB


class Requests:
    """The gateway's per-endpoint request counts, as differences from when it was made."""

    def __init__(self, nc: Any, topology: Topology) -> None:
        self.nc = nc
        self.subject = f"$SRV.STATS.{topology.service_name}"
        self.events_stream = topology.events_stream
        self.start: Counter[str] = Counter()

    async def now(self) -> Counter[str]:
        reply = await self.nc.request(self.subject, b"", timeout=10)
        return Counter({e["name"]: e["num_requests"] for e in json.loads(reply.data)["endpoints"]})

    async def reset(self) -> None:
        self.start = await self.now()

    async def made(self) -> dict[str, int]:
        """Requests per endpoint since `reset`, endpoints with none left out; the `read`s of
        stored events are checked here against the events stored, and left out too."""
        counts = await self.now()
        counts.subtract(self.start)
        made = {name: n for name, n in counts.items() if n}
        stored = (await self.nc.jetstream().stream_info(self.events_stream)).state.messages
        # One read per event that rang, one more at the start, and one that finds a page's end.
        assert made.pop("read", 0) <= 2 * stored + 2, (made, stored)
        return made

    async def until(self, endpoint: str, count: int, timeout: float = 60) -> None:
        """Wait until `endpoint` has had `count` requests since `reset` (bounded)."""
        deadline = time.monotonic() + timeout
        while (await self.made()).get(endpoint, 0) < count:
            assert time.monotonic() < deadline, await self.made()
            await asyncio.sleep(0.05)  # between reads of the counters, not a synchronisation


@pytest.fixture
async def requests(nc: Any, topology: Topology, client: AsyncClient) -> Requests:
    counts = Requests(nc, topology)
    await counts.reset()
    return counts


async def evalq_proc(settings: Settings, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *EVALQ,
        *args,
        env=settings_env(settings, COLUMNS="400"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finished(proc: asyncio.subprocess.Process, timeout: float = 120) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def evalq(settings: Settings, *args: str) -> tuple[int, str, str]:
    return await finished(await evalq_proc(settings, *args))


async def test_queue_asks_for_the_queue_and_one_page_of_jobs(
    settings: Settings, client: AsyncClient, requests: Requests
) -> None:
    jobs = [(await client.submit(**JOB, labels={"n": str(n)})).job_id for n in range(30)]
    await requests.reset()
    code, out, err = await evalq(settings, "queue")
    assert code == 0, err
    assert await requests.made() == {"queue": 1, "jobs": 1}
    rows = [line.split("│") for line in out.splitlines() if any(job[:8] in line for job in jobs)]
    header = next(line.split("┃") for line in out.splitlines() if "position" in line and "labels" in line)
    at = {name.strip(): index for index, name in enumerate(header)}
    assert [(c[at["position"]].strip(), c[at["job"]].strip(), c[at["labels"]].strip()) for c in rows] == [
        (str(n), job[:8], f"n={n}") for n, job in enumerate(jobs)
    ]
    await requests.reset()
    code, out, err = await evalq(settings, "queue", "--json")
    assert code == 0, err
    assert await requests.made() == {"queue": 1}
    assert json.loads(out)["queued_jobs"] == {"default": jobs}


async def test_wait_for_job_asks_for_the_job_before_and_after_its_events(
    client: AsyncClient, requests: Requests, worker_factory: Any
) -> None:
    job = (await client.submit(**JOB)).job_id
    await requests.reset()
    waiting = asyncio.create_task(client.wait_for_job(job, timeout=60))
    await requests.until("status", 1)  # asked while the job was queued: it follows the events
    await client.cancel_job(job)
    with pytest.raises(JobCancelled):
        await waiting
    # Once before following the events, once for the record after the terminal one.
    assert await requests.made() == {"status": 2, "cancel": 1}

    await worker_factory(evaluator=FAKE)
    accepted = await client.submit(**JOB, limit=2)
    await requests.reset()
    info = await client.wait_for_job(accepted.job_id, timeout=60)
    assert info.status == "completed" and info.result is not None and info.result.metrics
    assert info == await client.get_job(accepted.job_id)  # the record the gateway answers with
    assert await requests.made() == {"status": 3}  # wait_for_job's two, and the comparison's

    await requests.reset()
    assert (await client.wait_for_job(accepted.job_id, timeout=60)).status == "completed"  # ended already
    assert await requests.made() == {"status": 1}


async def test_watch_asks_for_the_job_once(settings: Settings, client: AsyncClient, requests: Requests) -> None:
    job = (await client.submit(**JOB)).job_id
    await requests.reset()
    watching = await evalq_proc(settings, "watch", job)
    await requests.until("status", 1)  # asked while the job was queued: it follows the events
    await client.cancel_job(job)
    code, out, err = await finished(watching)
    assert code == 3 and "cancelled" in err, err
    assert f"queued   {job}" in out
    assert await requests.made() == {"status": 1, "cancel": 1}

    await requests.reset()
    code, out, _ = await evalq(settings, "watch", job[:8], "--json")
    assert code == 3 and json.loads(out.splitlines()[-1])["type"] == "cancelled"
    assert await requests.made() == {"jobs": 1, "status": 1}  # the short id resolved, then the job


async def test_submit_and_wait_asks_nothing_after_the_submit(
    settings: Settings, client: AsyncClient, requests: Requests, worker_factory: Any
) -> None:
    await worker_factory(evaluator=FAKE)
    code, out, err = await evalq(
        settings, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--limit", "2", "--wait"
    )
    assert code == 0, err
    assert "exact_match" in out
    assert await requests.made() == {"submit": 1}
