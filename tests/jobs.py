"""What the tests submit: the shared request, the evaluators that stand in for lmms-eval,
and a submit that keeps its Idempotency-Key through faults."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

from evalq import AsyncClient

from .waiting import eventually

HERE = Path(__file__).resolve().parent

# The smallest valid request: lmms-eval's dummy model on the demo task this repo bundles.
# A test that needs a variant derives it (`{**JOB, "limit": 2}`) so the base stays one thing.
JOB: dict[str, Any] = {"model": "dummy", "tasks": ["evalq_demo"]}

# Stand-ins for lmms-eval that take its flags and write its outputs in a fraction of the time;
# the shell one starts fastest, for tests that run hundreds of jobs.
FAKE = [sys.executable, str(HERE / "fake_evaluator.py")]
STAND_IN = str(HERE / "fake_evaluator.sh")


async def submit_until_accepted(client: AsyncClient, key: str, deadline: float, **fields: Any) -> str:
    """Submit `JOB` (with `fields` over it) until a reply comes; returns the job id.

    A client that got no reply cannot tell a lost request from a lost reply, so it retries
    with the same Idempotency-Key: the tests that use this count on it never duplicating a job.
    `deadline` is a `time.monotonic()` value, shared by the submits of one burst; past it the
    test fails with the last error.
    """

    async def submit() -> str:
        return (await client.submit(**{**JOB, **fields}, idempotency_key=key, retries=0)).job_id

    # The pause between tries is the back-off a real client would take.
    return await eventually(
        submit,
        timeout=deadline - time.monotonic(),
        what=f"a reply to submit {key!r}",
        interval=0.2,
        retry_on=(Exception,),
    )


async def enqueue_unchecked(nc: Any, topology: Any, request: dict[str, Any]) -> str:
    """A job as a gateway from before a rule would have left it: a record and a work message,
    neither checked against today's rules. Returns its id."""
    from evalq.schemas import encode, now

    job_id = str(uuid.uuid4())
    js = nc.jetstream()
    created = now()
    record = {"job_id": job_id, "status": "queued", "created_at": created, "request": request, "pool": "default"}
    await (await js.key_value(topology.jobs_bucket)).create(job_id, encode(record))
    body = encode({"job_id": job_id, "request": request, "created_at": created})
    await js.publish(topology.work_subject("default", job_id), body, headers={"Nats-Msg-Id": job_id})
    return job_id


async def mark_completed(nc: Any, topology: Any, job_id: str, work: Any = None) -> None:
    """A job's record as its worker leaves it when it completes (metrics, and `work` when
    given), written by hand: a test of what reads a completed job needs no worker."""
    import msgspec

    from evalq.jobstore import JobStore
    from evalq.schemas import JobResult, now

    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    result = JobResult(metrics={"evalq_demo": {"exact_match,none": 0.6}}, duration_s=1.0, work=work)
    await jobs.transition(
        job_id, lambda info: msgspec.structs.replace(info, status="completed", completed_at=now(), result=result)
    )
