"""Re-score requests at the gateway and from the SDK: refused, never enqueued, unless their
source completed; built from the source's request."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from evalq import AsyncClient, Client, errors
from evalq.config import Settings
from evalq.gateway import Gateway
from evalq.schemas import encode
from evalq.topology import Topology

from .jobs import JOB, mark_completed

UNKNOWN = "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e"


async def stream_messages(nc: Any, topology: Topology, pool: str = "default") -> int:
    """Jobs enqueued: each has its record in the jobs bucket (the queue)."""
    return (await nc.jetstream().stream_info(f"KV_{topology.jobs_bucket}")).state.messages


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
    assert await stream_messages(nc, topology) == 1  # the cancelled source's record only


async def test_a_rescore_names_only_tasks_its_source_ran(client: AsyncClient, nc: Any, topology: Topology) -> None:
    source = (await client.submit(**JOB)).job_id
    await mark_completed(nc, topology, source)
    error = await refused(nc, topology, {**JOB, "tasks": ["evalq_demo", "evalq_shard_demo"], "rescore_of": source})
    assert (error["code"], error["path"]) == (422, "$.tasks[1]")
    error = await refused(nc, topology, {**JOB, "rescore_of": source, "shards": 2})
    assert (error["code"], error["path"]) == (422, "$.shards")
    assert await stream_messages(nc, topology) == 1  # the source's message only (no worker took it)
    accepted = await client.submit(**JOB, rescore_of=source)
    assert accepted.status == "queued" and await stream_messages(nc, topology) == 2


async def test_rescore_copies_the_source_request(client: AsyncClient, nc: Any, topology: Topology) -> None:
    fields = {
        "model_args": "pretrained=tiny,dtype=float32",
        "tasks": ["evalq_demo", "evalq_shard_demo"],
        "limit": 8,
        "num_fewshot": 2,
        "gen_kwargs": {"max_new_tokens": 16},
        "log_samples": False,
        "batch_size": "auto",
        "device": "cpu",
        "output_dir": "runs/a",
        "seed": 7,
        "labels": {"step": "300"},
        "shards": 2,
        "cache": "refresh",
        "timeout": 600,
    }
    source = (await client.submit(model="dummy", **fields)).job_id
    await mark_completed(nc, topology, source)
    accepted = await client.rescore(source[:8])  # a short id resolves as `status` resolves it
    info = await client.get_job(accepted.job_id)
    request = info.request
    assert request is not None and request.rescore_of == source
    assert (request.model, request.model_args, request.tasks) == ("dummy", fields["model_args"], fields["tasks"])
    assert (request.limit, request.num_fewshot, request.gen_kwargs, request.log_samples) == (
        8,
        2,
        {"max_new_tokens": 16},
        False,
    )
    assert (request.batch_size, request.device, request.output_dir, request.seed) == ("auto", "cpu", "runs/a", 7)
    assert info.labels == {"step": "300"} and info.pool == "default"
    # What only concerns running a model is not carried over: a re-score runs none.
    assert (request.shards, request.cache, request.timeout) == (1, None, None)

    again = await client.rescore(source, tasks=["evalq_shard_demo"], labels={"step": "300", "scorer": "v2"})
    info = await client.get_job(again.job_id)
    assert info.request is not None and info.request.tasks == ["evalq_shard_demo"]
    assert info.labels == {"step": "300", "scorer": "v2"}


async def test_rescore_refuses_before_submitting(client: AsyncClient, nc: Any, topology: Topology) -> None:
    source = (await client.submit(**JOB)).job_id
    with pytest.raises(errors.JobNotFound) as unknown:
        await client.rescore(UNKNOWN)
    assert unknown.value.code == 404
    with pytest.raises(errors.WrongState) as queued:
        await client.rescore(source)
    assert queued.value.path == "$.rescore_of"
    await mark_completed(nc, topology, source)
    with pytest.raises(errors.InvalidField) as other:
        await client.rescore(source, tasks=["evalq_demo", "mmmu_val"])
    assert other.value.path == "$.tasks[1]" and "evalq_demo" in other.value.message
    with pytest.raises(TypeError):
        await client.rescore(source, rescore_of=UNKNOWN)
    assert await stream_messages(nc, topology) == 1  # the source's message only


async def test_the_blocking_client_rescores_too(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    source = (await client.submit(**JOB)).job_id
    await mark_completed(nc, topology, source)

    def blocking() -> str:
        with Client(settings) as sync:
            return sync.rescore(source, labels={"k": "v"}).job_id

    # On another thread: the gateway answers on this test's loop.
    info = await client.get_job(await asyncio.to_thread(blocking))
    assert info.request is not None and info.request.rescore_of == source and info.labels == {"k": "v"}
