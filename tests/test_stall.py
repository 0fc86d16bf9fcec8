"""A job whose progress stops moving is reported stalled, and its pool's policy may fail it.

The stand-in's `slow` mode counts its documents and then keeps drawing the same full bar
until it is stopped: a hang that still prints.
"""

from __future__ import annotations

from typing import Any

import pytest

from evalq import AsyncClient
from evalq.policy import PoolPolicy, store_policy
from evalq.schemas import Failed, Stalled
from evalq.topology import Topology

from .events import all_events, follow, kinds
from .jobs import FAKE, JOB
from .waiting import eventually

pytestmark = pytest.mark.slow


@pytest.fixture
def hanging_evaluations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EVAL_MODE", "slow")


async def test_a_job_whose_progress_stops_is_reported_stalled_and_keeps_running(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology, hanging_evaluations: Any
) -> None:
    await store_policy(nc, topology, "default", PoolPolicy(stall_after_s=2), timeout=10)
    await worker_factory(evaluator=FAKE, cancel_grace=2.0)
    accepted = await client.submit(**JOB)

    async def stalled() -> Any:
        info = await client.get_job(accepted.job_id)
        return info if info.stalled_since is not None else None

    info = await eventually(stalled, timeout=60, what="the record marked stalled")
    assert info.status == "running", "a report-only stall leaves the job running"
    events = await all_events(client, accepted.job_id)
    marks = [e for e in events if isinstance(e, Stalled)]
    assert len(marks) == 1 and marks[0].action == "report" and marks[0].seconds >= 2
    assert marks[0].since == info.stalled_since
    # Said once: still running, not said again while nothing moves.
    await client.cancel_job(accepted.job_id)
    events = await follow(client, accepted.job_id, timeout=60)
    assert kinds(events).count("stalled") == 1 and kinds(events)[-1] == "cancelled"


async def test_the_pools_policy_may_fail_a_stalled_job(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology, hanging_evaluations: Any
) -> None:
    await store_policy(nc, topology, "default", PoolPolicy(stall_after_s=2, stall_action="fail"), timeout=10)
    await worker_factory(evaluator=FAKE, cancel_grace=2.0)
    accepted = await client.submit(**JOB)
    events = await follow(client, accepted.job_id, timeout=90)
    assert kinds(events)[-2:] == ["stalled", "failed"], kinds(events)
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.error.startswith("stalled:") and "2 s" in failed.error
    assert failed.log_tail and "Model Responding" in failed.log_tail
    info = await client.get_job(accepted.job_id)
    assert info.status == "failed" and info.attempts == 1


async def test_a_job_whose_progress_moves_is_never_stalled(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology
) -> None:
    # 40 documents at 0.05 s each: the bar moves every 50 ms for 2 s, well inside 1 s stalls.
    await store_policy(nc, topology, "default", PoolPolicy(stall_after_s=1, stall_action="fail"), timeout=10)
    await worker_factory(evaluator=FAKE)
    accepted = await client.submit(**{**JOB, "limit": 40})
    events = await follow(client, accepted.job_id, timeout=90)
    assert kinds(events)[-1] == "completed" and "stalled" not in kinds(events)
