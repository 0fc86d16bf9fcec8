"""A checkpoint's job as a training run leaves it, written by hand: a `saved_at` label, a
record that waited, started and completed at known times, and its events, so what shows a
turnaround can be checked to the decimal without a worker or a tracker."""

from __future__ import annotations

from typing import Any

import msgspec

from evalq import AsyncClient
from evalq.jobstore import JobStore
from evalq.schemas import Completed, JobResult, Started, Tracked, encode
from evalq.topology import Topology

from .jobs import JOB

SAVED_AT = "2026-11-27T11:50:00.000Z"
TIMES = {
    "created_at": "2026-11-27T11:50:40.000Z",
    "started_at": "2026-11-27T11:50:42.000Z",
    "completed_at": "2026-11-27T11:50:52.000Z",
}
LOGGED_AT = "2026-11-27T11:50:52.300Z"
# What `evalq status` and the job page show for it, once logged and before.
# The turnaround of `checkpoint_job`'s job, as `evalq status --json` and the dashboard give it.
TURNAROUND = {
    "saved_at": SAVED_AT,
    "logged_at": LOGGED_AT,
    "total": 52.3,
    "detection": 40.0,
    "queue": 2.0,
    "load": 1.5,
    "evaluation": 8.5,
    "logging": 0.3,
}
LOGGED = "52.3 s: detection 40.0, queue 2.0, load 1.5, evaluation 8.5, logging 0.3"
NOT_LOGGED = "52.0 s to completion, not logged yet: detection 40.0, queue 2.0, load 1.5, evaluation 8.5"


async def checkpoint_job(client: AsyncClient, nc: Any, topology: Topology, *, logged: bool = True) -> str:
    """A job that waited 2 s for its worker, loaded its model in 1.5 s, ran 8.5 s more and,
    when `logged`, was in the trackers 0.3 s after; its checkpoint was saved 40 s before it
    was submitted. Returns its id."""
    labels = {"step": "300", "saved_at": SAVED_AT}
    job = (await client.submit(**JOB, labels=labels)).job_id
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    result = JobResult(metrics={"evalq_demo": {"exact_match,none": 0.6}}, duration_s=10.0)
    await jobs.transition(
        job,
        lambda info: msgspec.structs.replace(info, status="completed", attempts=1, worker="w1", result=result, **TIMES),
    )
    events: list[Any] = [
        Started(job_id=job, time="2026-11-27T11:50:43.500Z", attempt=1, worker="w1", model_load_seconds=1.5),
        Completed(job_id=job, time=TIMES["completed_at"], attempt=1, worker="w1", labels=labels),
    ]
    if logged:
        events.append(track(job))
    for event in events:
        await nc.jetstream().publish(
            topology.event_subject(job, type(event).__struct_config__.tag, team="default"), encode(event)
        )
    return job


def track(job: str) -> Tracked:
    """The `tracked` event `evalq track` publishes for the job."""
    return Tracked(
        job_id=job, time=LOGGED_AT, attempt=1, labels={"step": "300", "saved_at": SAVED_AT}, trackers=["tensorboard"]
    )
