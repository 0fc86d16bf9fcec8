"""Which waiting job of a pool starts next, pure: priority with aging, fair share, quotas.

The gateway's dispatcher (`gateway/dispatcher.py`) admits jobs into a pool's work stream in
this order and keeps that stream shallow, so the next job a worker takes is the one this
module puts first. Positions and the reason a job waits come from the same order.

- **Priority.** A job's level is its request's `priority`; every `aging_s` it waits raises it
  one level, up to `high` (aging never makes a job urgent), so nothing waits for ever.
- **Fair share.** Within a level, the next job comes from the team whose use of the pool
  (GPU-seconds, each decayed by its age with the pool's half-life, running jobs included),
  divided by its share, is least. Each job placed adds the pool's mean job cost to its
  team's use, so a long queue interleaves teams rather than draining one first.
- **Quotas.** A team's running GPUs (running and admitted jobs, and a sharded job's running
  and released pieces) never pass its `max_running_gpus`: its next job waits, and a later
  team's goes first. A quota'd team's sharded job has its pieces held, and `releases` lets
  them go as the quota has room, before the team's waiting jobs.
- **Yielding.** A worker running a piece of a sharded job of lower priority counts as free
  for a job of higher priority: the worker takes the job before the piece's next sibling.
- **Preemption.** A high or urgent job that no worker is free for takes the worker of a
  running low job (`victims`): stopped, handed back, resumed later from its journal.
"""

from __future__ import annotations

import datetime as dt
import functools
import heapq
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from .fields import PRIORITIES, Priority
from .schemas import JobSummary, TeamUse

__all__ = [
    "DEFAULT_TEAM",
    "PoolView",
    "Scheduling",
    "TeamPolicy",
    "admissions",
    "gpu_seconds",
    "level",
    "order",
    "rank",
    "releases",
    "team_uses",
    "victims",
]

DEFAULT_TEAM = "default"
_HIGH = PRIORITIES.index("high")


class TeamPolicy(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One team's place in a pool: its weight in fair share and its limits."""

    share: Annotated[float, Meta(gt=0, le=1_000_000)] = 1.0
    max_running_gpus: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    max_queued: Annotated[int, Meta(ge=0, le=100_000_000)] | None = None
    max_priority: Priority = "urgent"


class Scheduling(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A pool's scheduling settings, part of its `PoolPolicy`."""

    # Teams by name (a NATS account, or `default`); a team not listed gets `default_team`.
    teams: dict[Annotated[str, Meta(min_length=1, max_length=256)], TeamPolicy] = {}
    default_team: TeamPolicy = TeamPolicy()
    aging_s: Annotated[float, Meta(gt=0, le=30 * 86400)] = 600.0
    half_life_s: Annotated[float, Meta(gt=0, le=365 * 86400)] = 3600.0
    # A waiting high or urgent job with no free worker stops a running low one (not sharded),
    # which its journal resumes later.
    preempt: bool = True

    def team(self, name: str) -> TeamPolicy:
        return self.teams.get(name, self.default_team)


def rank(priority: str) -> int:
    """A level's index, lowest first; an unknown level (an older record) counts as normal."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else 1


@functools.lru_cache(maxsize=1 << 18)
def _micros(when: str | None) -> int | None:
    # Cached: a plan reads the same jobs' times again on every change of the queue.
    if not when:
        return None
    try:
        value = dt.datetime.fromisoformat(when)
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp() * 1_000_000)


def level(job: JobSummary, now_us: int, aging_s: float) -> int:
    """Its level now: the request's, raised one per `aging_s` waited, up to `high`."""
    base = rank(job.priority)
    waited = max(0, now_us - (_micros(job.created_at) or now_us)) / 1e6
    aged = base + int(waited // aging_s)
    return base if base >= _HIGH else min(aged, _HIGH)


def gpu_seconds(job: JobSummary, now_us: int) -> float:
    """GPU-seconds a job used: its pieces' seconds for a sharded job, else its run time
    times its GPUs; a running job's so far (each running piece its job's GPUs)."""
    if job.gpu_s is not None:
        return job.gpu_s
    started = _micros(job.started_at)
    if started is None:
        return 0.0
    end = _micros(job.completed_at) or now_us
    gpus = job.num_gpus * max(1, job.pieces_running) if job.shards > 1 else job.num_gpus
    return max(0.0, (end - started) / 1e6) * gpus


@dataclass
class PoolView:
    """One pool's jobs as the scheduler needs them, from the job history's summaries."""

    waiting: list[JobSummary] = field(default_factory=list)  # queued, not yet admitted
    admitted: list[JobSummary] = field(default_factory=list)  # queued, in the work stream
    running: list[JobSummary] = field(default_factory=list)  # running or cancelling
    use: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    running_gpus: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    mean_cost: float = 1.0  # mean GPU-seconds of the pool's finished jobs

    @classmethod
    def of(cls, jobs: Iterable[JobSummary], *, now_us: int, half_life_s: float) -> PoolView:
        view = cls()
        costs: list[float] = []
        for job in jobs:
            if job.status == "queued":
                (view.admitted if job.admitted_at else view.waiting).append(job)
                if job.admitted_at:
                    view.running_gpus[job.team] += job.num_gpus
            elif job.status in ("running", "cancelling"):
                view.running.append(job)
                view.running_gpus[job.team] += job.num_gpus if job.shards == 1 else _active(job)
            else:
                spent = gpu_seconds(job, now_us)
                if spent <= 0:
                    continue
                ended = _micros(job.completed_at) or now_us
                age = max(0.0, (now_us - ended) / 1e6)
                view.use[job.team] += spent * math.pow(0.5, age / half_life_s)
                costs.append(spent)
        if costs:
            recent = costs[-200:]
            view.mean_cost = max(1e-3, sum(recent) / len(recent))
        # A job that has started, or been admitted, counts at least a mean job's cost from the
        # moment it has its worker: otherwise a team whose job started a moment ago would look
        # as if it had used nothing, and get the next worker too.
        for job in view.running:
            view.use[job.team] += max(gpu_seconds(job, now_us), view.mean_cost * job.num_gpus)
        for job in view.admitted:
            view.use[job.team] += view.mean_cost * job.num_gpus
        return view


def _active(job: JobSummary) -> int:
    """The GPUs a sharded job holds: its running pieces' and those released to the pieces
    stream (each will take a worker), at least those its plan runs on."""
    return job.num_gpus * max(1, job.pieces_running + job.pieces_waiting)


def releases(view: PoolView, scheduling: Scheduling) -> list[tuple[JobSummary, int]]:
    """The running sharded jobs whose held pieces may go now, each with how many of its
    pieces may then be queued or running (`sharding.release`'s target), within its team's
    `max_running_gpus`; the highest priority first, then the earliest started. A job of the
    team waiting at a higher priority gets the quota first: the sharded job then keeps only
    the GPUs its plan took. Each release is counted in `view` (its job's pieces, its team's
    GPUs), so the admissions that follow see it."""
    at = {job.job_id: i for i, job in enumerate(view.running)}
    above: dict[str, int] = {}  # each team's highest waiting priority
    for job in view.waiting:
        above[job.team] = max(above.get(job.team, -1), rank(job.priority))
    held = [j for j in view.running if j.status == "running" and j.pieces_held]
    held.sort(key=lambda j: (-rank(j.priority), _micros(j.started_at) or 0, j.job_id))
    chosen: list[tuple[JobSummary, int]] = []
    for job in held:
        quota = scheduling.team(job.team).max_running_gpus
        active = job.pieces_running + job.pieces_waiting
        before = _active(job)
        if quota is None:
            more = job.pieces_held  # the quota was lifted: let them all go
        else:
            room = 0 if above.get(job.team, -1) > rank(job.priority) else quota - view.running_gpus.get(job.team, 0)
            more = min(job.pieces_held, (before + room) // job.num_gpus - active)
            if active == 0:
                more = max(more, 1)  # the GPUs its plan took are still its own
        if more <= 0:
            continue
        chosen.append((job, active + more))
        released = msgspec.structs.replace(
            job, pieces_held=job.pieces_held - more, pieces_waiting=job.pieces_waiting + more
        )
        view.running_gpus[job.team] += _active(released) - before
        view.running[at[job.job_id]] = released
    return chosen


def _key(job: JobSummary) -> tuple[int, int, str]:
    """Submission order: the record's sequence in the jobs bucket (exact, whichever gateway
    took it), then its time."""
    return (job.stream_seq or 0, _micros(job.created_at) or 0, job.job_id)


def order(view: PoolView, scheduling: Scheduling, now_us: int) -> list[tuple[JobSummary, str | None]]:
    """The waiting jobs in the order they will start, each with why it waits (None for the
    first of its kind: nothing is ahead of it but a free worker).

    O(n log n): each job's level and key are computed once, and the reason is read from
    what is ahead so far (the highest level, and the newest job of each team), not by
    looking at every job ahead again.
    """
    aging = scheduling.aging_s
    by_level: dict[int, dict[str, list[tuple[tuple[int, int, str], JobSummary]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for key, job in sorted(((_key(j), j) for j in view.waiting), key=lambda pair: pair[0]):
        by_level[level(job, now_us, aging)][job.team].append((key, job))
    use = dict(view.use)
    ahead = _Ahead()
    for job in view.admitted:  # in the work stream already: ahead of every waiting job
        ahead.add(job.team, level(job, now_us, aging), _key(job))
    placed: list[tuple[JobSummary, str | None]] = []
    for lvl in sorted(by_level, reverse=True):
        queues = by_level[lvl]
        heads = dict.fromkeys(queues, 0)
        heap = [(use.get(t, 0.0) / scheduling.team(t).share, q[0][0], t) for t, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            _, _, team = heapq.heappop(heap)
            key, job = queues[team][heads[team]]
            heads[team] += 1
            placed.append((job, ahead.why(team, lvl, key)))
            ahead.add(team, lvl, key)
            use[team] = use.get(team, 0.0) + view.mean_cost * job.num_gpus
            if heads[team] < len(queues[team]):
                heapq.heappush(heap, (use[team] / scheduling.team(team).share, queues[team][heads[team]][0], team))
    return placed


class _Ahead:
    """What is ahead of the next job placed: the highest level, and the two teams whose
    newest job ahead is newest (enough to ask "is another team's later job ahead of mine")."""

    def __init__(self) -> None:
        self.count = 0
        self.top = -1
        self.first: tuple[tuple[int, int, str], str] | None = None  # (newest key, its team)
        self.second: tuple[tuple[int, int, str], str] | None = None  # the newest of another team

    def add(self, team: str, lvl: int, key: tuple[int, int, str]) -> None:
        self.count += 1
        self.top = max(self.top, lvl)
        if self.first is None or self.first[1] == team:
            if self.first is None or key > self.first[0]:
                self.first = (key, team)
        elif key > self.first[0]:
            self.first, self.second = (key, team), self.first
        elif self.second is None or key > self.second[0]:
            self.second = (key, team)

    def why(self, team: str, lvl: int, key: tuple[int, int, str]) -> str | None:
        if not self.count:
            return None
        if self.top > lvl:
            return "behind higher priority"
        other = self.second if self.first is not None and self.first[1] == team else self.first
        if other is not None and other[0] > key:
            return "fair share: other teams have used less of the pool"
        return "behind earlier jobs"


def admissions(
    view: PoolView,
    ordered: list[tuple[JobSummary, str | None]],
    scheduling: Scheduling,
    *,
    idle_workers: int,
    busy_with: Mapping[str, int],
) -> tuple[list[JobSummary], dict[str, str]]:
    """The jobs to admit now, in order, and the quota that holds back each job it skips.

    `idle_workers` counts the pool's ready workers with no job in hand; `busy_with` maps a
    job id to how many workers run it (a sharded job's pieces). The work stream holds at most
    as many admitted jobs as there are workers free for them, less the pieces of sharded jobs
    of equal or higher priority that are waiting for a worker, so it stays shallow.
    """
    # Only a sharded job's workers yield: between pieces (a whole job is preempted instead).
    by_id = {job.job_id: job for job in view.running if job.shards > 1}
    running_gpus = dict(view.running_gpus)
    taken: list[JobSummary] = []
    held: dict[str, str] = {}
    for job, _ in ordered:
        mine = rank(job.priority)
        # Workers whose next message would be a piece of a lower-priority job yield to this one.
        yielding = sum(n for jid, n in busy_with.items() if jid in by_id and rank(by_id[jid].priority) < mine)
        waiting_pieces = sum(j.pieces_waiting for j in view.running if rank(j.priority) >= mine)
        free = idle_workers + yielding - len(view.admitted) - len(taken) - waiting_pieces
        if free <= 0:
            if yielding == 0:
                break
            continue
        quota = scheduling.team(job.team).max_running_gpus
        if quota is not None and running_gpus.get(job.team, 0) + job.num_gpus > quota:
            held[job.job_id] = f"team quota: {job.team} runs {running_gpus.get(job.team, 0)} of {quota} GPUs"
            continue
        taken.append(job)
        running_gpus[job.team] = running_gpus.get(job.team, 0) + job.num_gpus
    return taken, held


def victims(view: PoolView, waiting: list[JobSummary], asked: int) -> list[JobSummary]:
    """The running low jobs (not sharded) to preempt for the high and urgent jobs in
    `waiting` that got no worker, less the `asked` preemptions still under way; the latest
    started first, the least work to set aside."""
    need = sum(1 for job in waiting if rank(job.priority) >= _HIGH) - asked
    low = [j for j in view.running if j.status == "running" and j.shards == 1 and rank(j.priority) == 0]
    low.sort(key=lambda j: _micros(j.started_at) or 0, reverse=True)
    return low[: max(0, need)]


def team_uses(
    views: Mapping[str, PoolView], scheduling: Mapping[str, Scheduling], teams: Iterable[tuple[str, str]] = ()
) -> list[TeamUse]:
    """Each team's use of each pool: every team with a job there, and every team a policy names."""
    rows: list[TeamUse] = []
    for pool, view in sorted(views.items()):
        policy = scheduling.get(pool, Scheduling())
        names = set(view.use) | set(view.running_gpus) | {j.team for j in view.waiting + view.admitted}
        names |= set(policy.teams) | {team for p, team in teams if p == pool}
        for name in sorted(names):
            team = policy.team(name)
            rows.append(
                TeamUse(
                    team=name,
                    pool=pool,
                    share=team.share,
                    use_gpu_s=round(view.use.get(name, 0.0), 3),
                    running_gpus=view.running_gpus.get(name, 0),
                    queued=sum(1 for j in view.waiting + view.admitted if j.team == name),
                    max_running_gpus=team.max_running_gpus,
                    max_queued=team.max_queued,
                    max_priority=team.max_priority,
                )
            )
    return rows
