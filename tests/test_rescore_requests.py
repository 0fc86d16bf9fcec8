"""Re-score requests at the gateway: refused, never enqueued, unless their source completed."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from evalq import AsyncClient
from evalq.gateway import Gateway
from evalq.jobstore import JobStore
from evalq.schemas import JobResult, Work, encode, now
from evalq.topology import Topology

from .jobs import JOB

UNKNOWN = "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e"


async def stream_messages(nc: Any, topology: Topology, pool: str = "default") -> int:
    return (await nc.jetstream().stream_info(topology.work_stream(pool))).state.messages


async def complete(nc: Any, topology: Topology, job_id: str, work: Work | None = None) -> None:
    """Mark a job completed as a worker would, with metrics and, when given, its work."""
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    result = JobResult(metrics={"evalq_demo": {"exact_match,none": 0.6}}, duration_s=1.0, work=work)
    await jobs.transition(
        job_id, lambda info: msgspec.structs.replace(info, status="completed", completed_at=now(), result=result)
    )


async def refused(nc: Any, topology: Topology, body: dict[str, Any]) -> dict[str, Any]:
    reply = await nc.request(topology.subject("submit"), encode(body), timeout=10)
    error: dict[str, Any] = json.loads(reply.data)["error"]
    assert reply.headers["Nats-Service-Error-Code"] == str(error["code"])
    return error


async def test_a_rescore_of_an_unknown_job_is_404_and_never_enqueued(
    nc: Any, gateway: Gateway, topology: Topology
) -> None:
    error = await refused(nc, topology, {**JOB, "rescore_of": UNKNOWN})
    assert (error["code"], error["path"]) == (404, "$.rescore_of")
    assert UNKNOWN in error["message"]
    assert await stream_messages(nc, topology) == 0


async def test_a_rescore_of_a_job_not_completed_is_409_and_never_enqueued(
    client: AsyncClient, nc: Any, topology: Topology
) -> None:
    source = (await client.submit(**JOB)).job_id
    error = await refused(nc, topology, {**JOB, "rescore_of": source})
    assert (error["code"], error["path"]) == (409, "$.rescore_of")
    assert "queued" in error["message"]
    await client.cancel_job(source)  # a failed or cancelled source has nothing to score either
    error = await refused(nc, topology, {**JOB, "rescore_of": source})
    assert (error["code"], error["path"]) == (409, "$.rescore_of")
    assert (await client.queue()).queue_size == 0
    assert await stream_messages(nc, topology) == 0


async def test_a_rescore_names_only_tasks_its_source_ran(client: AsyncClient, nc: Any, topology: Topology) -> None:
    source = (await client.submit(**JOB)).job_id
    await complete(nc, topology, source)
    error = await refused(nc, topology, {**JOB, "tasks": ["evalq_demo", "evalq_shard_demo"], "rescore_of": source})
    assert (error["code"], error["path"]) == (422, "$.tasks[1]")
    error = await refused(nc, topology, {**JOB, "rescore_of": source, "shards": 2})
    assert (error["code"], error["path"]) == (422, "$.shards")
    assert await stream_messages(nc, topology) == 1  # the source's message only (no worker took it)
    accepted = await client.submit(**JOB, rescore_of=source)
    assert accepted.status == "queued" and await stream_messages(nc, topology) == 2
