"""A job cannot hang forever: past its time limit (its own, or its pool's) it is stopped like
a cancel and ends `failed` with reason `timeout` and its log tail."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import psutil
import pytest

from evalq import AsyncClient, InvalidField
from evalq.policy import PoolPolicy, store_policy
from evalq.schemas import Failed, Started
from evalq.topology import Topology

from .conftest import EVALQ, run_command, settings_env
from .events import follow, kinds
from .jobs import FAKE, JOB, enqueue_unchecked


@pytest.fixture
def slow_evaluations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EVAL_MODE", "slow")  # runs until stopped


async def test_a_job_past_its_timeout_is_stopped_and_failed(
    client: AsyncClient, worker_factory: Any, slow_evaluations: Any
) -> None:
    handle = await worker_factory(evaluator=FAKE, cancel_grace=2.0)
    accepted = await client.submit(**JOB, timeout=2)
    pids: list[int] = []

    def on_event(event: Any) -> None:
        if isinstance(event, Started) and handle.worker.current is not None:
            assert handle.worker.current.process is not None
            pids.append(handle.worker.current.process.pid)

    events = await follow(client, accepted.job_id, timeout=60, on_event=on_event)
    assert kinds(events)[-1] == "failed"
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.error.startswith("timeout:") and "2 s" in failed.error
    assert failed.log_tail and "Model Responding" in failed.log_tail
    info = await client.get_job(accepted.job_id)
    assert info.status == "failed" and (info.error or "").startswith("timeout:")
    assert pids, "the job never started"
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE


async def test_the_pools_default_and_maximum_apply(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology, slow_evaluations: Any
) -> None:
    await store_policy(nc, topology, "default", PoolPolicy(default_timeout_s=2, max_timeout_s=60), timeout=10)
    with pytest.raises(InvalidField) as refused:
        await client.submit(**JOB, timeout=61)
    assert refused.value.path == "$.timeout"
    await worker_factory(evaluator=FAKE, cancel_grace=2.0)
    accepted = await client.submit(**JOB)  # no timeout of its own: the pool's default
    events = await follow(client, accepted.job_id, timeout=60)
    failed = events[-1]
    assert isinstance(failed, Failed) and "limit of 2 s" in failed.error


async def test_the_worker_checks_the_policy_again(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology
) -> None:
    """A job the gateway would refuse now (queued before the policy changed) is refused by the worker."""
    job_id = await enqueue_unchecked(
        nc, topology, {**JOB, "model_args": {"pretrained": "/etc", "trust_remote_code": True}}
    )
    await worker_factory(evaluator=FAKE)
    events = await follow(client, job_id, timeout=60)
    failed = events[-1]
    assert isinstance(failed, Failed) and "policy of pool 'default' refuses it" in failed.error
    assert not any(isinstance(e, Started) for e in events), "the job ran"


async def test_the_cli_and_the_sdk_set_the_jobs_own_limit(settings: Any, client: AsyncClient) -> None:
    code, out, err = await run_command(
        [*EVALQ, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--job-timeout", "5", "--json"],
        settings_env(settings),
    )
    assert code == 0, err
    job_id = msgspec.json.decode(out)["job_id"]
    info = await client.get_job(job_id)
    assert info.request is not None and info.request.timeout == 5
    with pytest.raises(asyncio.TimeoutError):  # the wait's own timeout, not the job's
        await client.submit_and_wait(timeout=0.5, job_timeout=7, **JOB)
