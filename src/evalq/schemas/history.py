"""The wire types of the job history (`<prefix>.jobs`) and the queue's views: a query, a page
of job summaries, the queue's rows and each team's use."""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any

from msgspec import Meta

from ..fields import ID_PREFIX, Labels, PoolName
from .wire import JobStatus, Progress, Wire

__all__ = ["JOBS_PAGE_MAX", "JobSummary", "JobsPage", "JobsQuery", "QueuedRow", "TeamUse", "TeamsReply"]


# Zoned RFC 3339: a time without its zone would mean a different instant on every machine.
Instant = Annotated[_dt.datetime, Meta(tz=True)]
# `task/metric` (lmms-eval's key, or its name before the `,filter`), `task/*`, or `*` for all.
MetricRef = Annotated[str, Meta(min_length=1, max_length=256)]
JOBS_PAGE_MAX = 1000


class JobsQuery(Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of `jobs`: filters (all must hold), a page size and the cursor of the page before."""

    status: Annotated[list[JobStatus], Meta(max_length=6)] = []  # any of these
    pool: PoolName | None = None
    labels: Labels = {}  # every one must match
    created_after: Instant | None = None  # inclusive
    created_before: Instant | None = None  # exclusive
    # The start of a job id, lowercase hex: how short ids are resolved.
    id_prefix: Annotated[str, Meta(min_length=1, max_length=36, pattern=rf"\A{ID_PREFIX.pattern}\Z")] | None = None
    # Which metrics each summary carries; none by default, so a page stays small.
    metrics: Annotated[list[MetricRef], Meta(max_length=64)] = []
    limit: Annotated[int, Meta(ge=1, le=JOBS_PAGE_MAX)] = 100
    cursor: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    team: Annotated[str, Meta(min_length=1, max_length=256)] | None = None

    def __post_init__(self) -> None:
        for index, ref in enumerate(self.metrics):
            task, slash, metric = ref.partition("/")
            if ref != "*" and (not slash or not task or not metric):
                raise ValueError(f"Expected `task/metric`, `task/*` or `*`, got {ref!r} - at `$.metrics[{index}]`")


class JobSummary(Wire, frozen=True, kw_only=True):
    """One job as history tables show it: a JobInfo without its request, pieces or artifacts."""

    job_id: str
    status: JobStatus
    pool: str = "default"
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    model: str | None = None
    tasks: list[str] = []
    labels: dict[str, str] = {}
    attempts: int = 0
    worker: str | None = None
    shards: int = 1
    shards_done: int = 0
    progress: Progress | None = None
    duration_s: float | None = None
    # Only those the query asked for (`JobsQuery.metrics`).
    metrics: dict[str, dict[str, Any]] = {}
    error: str | None = None
    team: str = "default"
    priority: str = "normal"
    num_gpus: int = 1
    # GPU-seconds a finished job used (its pieces' for a sharded job).
    gpu_s: float | None = None
    admitted_at: str | None = None
    # Its record's sequence in the jobs bucket while it waits: the order of submission.
    stream_seq: int | None = None
    # A sharded job's pieces waiting for a worker, and running.
    pieces_waiting: int = 0
    pieces_running: int = 0
    # Its pieces its team's quota holds back (no message yet).
    pieces_held: int = 0
    # Its gate policy's name, and the verdict (GO, NO-GO, INCONCLUSIVE) once judged.
    gate: str | None = None
    verdict: str | None = None


class QueuedRow(Wire, frozen=True, kw_only=True):
    """One waiting job in the queue's order. Another team's job is anonymous: no id, no team."""

    position: int
    job_id: str | None = None
    team: str | None = None
    priority: str = "normal"
    waiting: str | None = None


class TeamUse(Wire, frozen=True, kw_only=True):
    """One team in one pool, as `teams` answers: its use of the pool and its limits."""

    team: str
    pool: str
    share: float
    # GPU-seconds, each decayed by its age with the pool's half-life, running jobs included.
    use_gpu_s: float
    running_gpus: int
    queued: int
    max_running_gpus: int | None = None
    max_queued: int | None = None
    max_priority: str = "urgent"


class TeamsReply(Wire, frozen=True, kw_only=True):
    teams: list[TeamUse]


class JobsPage(Wire, frozen=True, kw_only=True):
    """Jobs newest first (by created_at, then job_id); `next_cursor` is None on the last page."""

    jobs: list[JobSummary]
    next_cursor: str | None = None
