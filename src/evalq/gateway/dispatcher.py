"""The dispatcher: each pool's waiting jobs let into its work stream in the scheduler's order.

A submitted job is a `queued` record in the jobs bucket. The dispatcher, inside the gateway,
follows the same history index the gateway keeps for `jobs` and the workers bucket, and
whenever either changes (and every `tick` seconds, for aging) it asks `scheduling` which
jobs go next, marks each `admitted` with a compare-and-set (`lifecycle.admit`: of two
gateways, one wins each job) and only then publishes its work message. The work stream so
holds only jobs that a free worker should take now, and a worker's plain fetch takes the
scheduler's choice. Positions and the reason a job waits come from the same `Plan`.

A team with a `max_running_gpus` quota has its sharded jobs' pieces planned `held`; each
pass first releases those the quota has room for (`scheduling.releases`, `sharding.release`
with a compare-and-set, then their messages), before the team's waiting jobs.

A gateway that died between the mark and the publish leaves a job admitted with no message:
every `tick` the admitted jobs older than `repair_after` are looked up in the work stream
by subject, and one not there is published again; so are the pieces it released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from .. import jetstream, lifecycle, sharding
from ..lifecycle import Applied, Recorder
from ..policy import Policies
from ..registry import Registry
from ..scheduling import PoolView, admissions, order, rank, releases, victims
from ..schemas import TERMINAL, JobInfo, JobSummary, PieceItem, WorkerInfo, WorkItem, encode, now
from ..topology import Topology
from .history import History

__all__ = ["Dispatcher", "Plan"]

log = logging.getLogger("evalq.gateway")


@dataclass
class Plan:
    """One pool's queue as the scheduler sees it at `at`: admitted jobs first (the work
    stream's order), then the waiting ones in the order they will be admitted."""

    at: float
    version: int
    jobs: list[JobSummary] = field(default_factory=list)
    why: dict[str, str | None] = field(default_factory=dict)
    view: PoolView = field(default_factory=PoolView)
    _at: dict[str, int] | None = field(default=None, repr=False)

    def position(self, job_id: str) -> int | None:
        if self._at is None:  # built once per plan: `status` asks it of many jobs
            self._at = {job.job_id: index for index, job in enumerate(self.jobs)}
        return self._at.get(job_id)


class Dispatcher:
    """Admits each pool's jobs while its gateway serves (`start`, `stop`); `plan` answers
    positions and reasons."""

    def __init__(
        self,
        nc: Client,
        topology: Topology,
        *,
        history: History,
        registry: Registry,
        policies: Policies,
        recorder: Recorder,
        pools: Callable[[], Awaitable[list[str]]],
        js: JetStreamContext,
        timeout: float,
        tick: float = 1.0,
        repair_after: float = 10.0,
    ) -> None:
        self.nc = nc
        self.topology = topology
        self.history = history
        self.registry = registry
        self.policies = policies
        self.recorder = recorder
        self.pools = pools
        self.js = js
        self.timeout = timeout
        self.tick = tick
        self.repair_after = repair_after
        self._plans: dict[str, Plan] = {}
        # Admitted by this gateway, not yet seen admitted in the index.
        self._mine: dict[str, float] = {}
        self._checked: dict[str, float] = {}  # when each admitted job's message was looked up
        self._pieces_checked: dict[str, float] = {}  # and each job's released pieces'
        self._preempting: dict[str, float] = {}  # low jobs asked to give up their worker
        # Pieces held after this gateway released some, until the index shows the release.
        self._releasing: dict[str, int] = {}
        self._held_seen: dict[str, int] = {}  # the index's version each pool's releases last saw
        self._full: dict[str, float] = {}  # when each pool last had a full pass
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.admitted = 0  # jobs this dispatcher admitted (tests, benchmarks)
        self.last_pass_s = 0.0

    async def start(self) -> Dispatcher:
        self._task = asyncio.create_task(self._run(), name="dispatcher")
        return self

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)

    async def _run(self) -> None:
        await self.history.loaded.wait()
        while not self._stopping:
            self.history.changed.clear()
            self.registry.changed.clear()
            idle_passes = False
            try:
                for pool in await self.pools():
                    idle_passes = await self.dispatch(pool) or idle_passes
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an outage: the next change or tick tries again
                log.warning("dispatcher: %s", exc)
            waits = [asyncio.ensure_future(e.wait()) for e in (self.history.changed, self.registry.changed)]
            try:
                await asyncio.wait(waits, timeout=self.tick, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            with contextlib.suppress(Exception):  # the next pass tries again
                await self._settle_cancelled()
            if idle_passes:
                # A plan that started nothing cost O(n log n) in the waiting jobs: under a burst
                # of changes, the passes leave the gateway most of its time for requests.
                await asyncio.sleep(min(self.tick, 2 * self.last_pass_s))

    # --- the plan ---------------------------------------------------------------------

    async def plan(self, pool: str, *, fresh: bool = False, at_least: int | None = None) -> Plan:
        """The pool's plan, made again when the index changed since (or when `fresh`); with
        `at_least`, any plan made from that version of the index on will do."""
        version = self.history.index.version
        cached = self._plans.get(pool)
        if cached is not None and not fresh and time.monotonic() - cached.at < self.tick:
            current = cached.version == version
            if current or (at_least is not None and at_least <= cached.version <= version):
                return cached
        policy = (await self.policies.get(pool)).scheduling
        now_us = int(time.time() * 1_000_000)
        jobs = self.history.index.scheduled(pool)
        if self._releasing:
            jobs = [self._as_released(job) for job in jobs]
        view = PoolView.of(jobs, now_us=now_us, half_life_s=policy.half_life_s)
        # Admitted here a moment ago: the watch has not brought the mark back yet.
        for job_id in list(self._mine):
            seen = self.history.index.get(job_id)
            if seen is None or seen.status != "queued" or seen.admitted_at:
                del self._mine[job_id]
        still = [j for j in view.waiting if j.job_id in self._mine]
        if still:
            view.waiting = [j for j in view.waiting if j.job_id not in self._mine]
            view.admitted.extend(still)
            for job in still:
                view.running_gpus[job.team] += job.num_gpus
        ordered = order(view, policy, now_us)
        admitted = sorted(view.admitted, key=lambda j: (j.admitted_at or "", j.job_id))
        plan = Plan(
            at=time.monotonic(),
            version=version,
            jobs=admitted + [job for job, _ in ordered],
            why={job.job_id: why for job, why in ordered},
            view=view,
        )
        self._plans[pool] = plan
        return plan

    def _as_released(self, job: JobSummary) -> JobSummary:
        """`job` with the pieces released here a moment ago queued: the watch has not brought
        the release back yet, and its GPUs count against the team's quota already."""
        left = self._releasing.get(job.job_id)
        if left is None:
            return job
        if job.pieces_held <= left or job.status != "running":
            del self._releasing[job.job_id]
            return job
        gone = job.pieces_held - left
        return msgspec.structs.replace(job, pieces_held=left, pieces_waiting=job.pieces_waiting + gone)

    # --- admitting ----------------------------------------------------------------------

    async def dispatch(self, pool: str) -> bool:
        """One pass over `pool`; True when it planned and admitted nothing (a pass to space out)."""
        started = time.perf_counter()
        policy = (await self.policies.get(pool)).scheduling
        # Listed or not: a worker takes jobs before it has listed its models and tasks.
        workers = [w for w in await self.registry.workers() if w.pool == pool]
        running_on = self._running_on(pool)
        busy = [job for job in (self._busy_with(w, running_on) for w in workers) if job]
        idle = len(workers) - len(busy)
        live = self.history.index.live(pool)
        # Held pieces may go only after a change (a piece ended, a job ended or came): the
        # index's version says whether one came since the last plan; the pass every 5 s
        # catches a policy that changed.
        version = self.history.index.version
        holding = self._held_seen.get(pool) != version and any(j.pieces_held and j.status == "running" for j in live)
        if (
            not holding
            and not self._may_admit(pool, idle, policy.preempt)
            and time.monotonic() - self._full.get(pool, 0.0) < 5.0
        ):
            return False  # nothing could start: no plan (whose cost grows with the queue)
        self._full[pool] = time.monotonic()
        self._held_seen[pool] = version
        plan = await self.plan(pool, fresh=True)
        released = False
        # Before the waiting jobs: a started job's pieces go first within its team's quota.
        for job, active in releases(plan.view, policy):
            released = await self._release(pool, job, active) or released
        busy_with = Counter(busy)
        waiting = [(job, plan.why.get(job.job_id)) for job in plan.jobs if not job.admitted_at]
        waiting = [(job, why) for job, why in waiting if job.job_id not in self._mine]
        taken, held = admissions(plan.view, waiting, policy, idle_workers=idle, busy_with=busy_with)
        for job_id, why in held.items():
            plan.why[job_id] = why
        for job in taken:
            await self._admit(pool, job)
        if policy.preempt:
            chosen = {j.job_id for j in taken} | set(held)
            left = [job for job, _ in waiting if job.job_id not in chosen]
            await self._preempt(plan.view, left)
        await self._repair(pool, plan.view.admitted)
        await self._repair_pieces(pool, [j for j in live if j.pieces_waiting and j.status == "running"])
        self.last_pass_s = time.perf_counter() - started
        return not taken and not released

    def _may_admit(self, pool: str, idle: int, preempt: bool) -> bool:
        """Whether a pass could start anything: a free worker beyond the admitted jobs, a
        waiting job that outranks a running sharded job's pieces, or one that may preempt.
        A count over the queued jobs, far cheaper than a plan."""
        admitted, top = 0, -1
        running: list[JobSummary] = []
        for job in self.history.index.live(pool):
            if job.status != "queued":
                running.append(job)
            elif job.admitted_at or job.job_id in self._mine:
                admitted += 1
            else:
                top = max(top, rank(job.priority))
        if top < 0:
            return False
        if idle > admitted:
            return True
        if any(j.shards > 1 and rank(j.priority) < top for j in running):
            return True
        return preempt and top >= rank("high") and any(j.shards == 1 and rank(j.priority) == 0 for j in running)

    async def _preempt(self, view: PoolView, waiting: list[JobSummary]) -> None:
        """Ask the workers of running low jobs to give them up for waiting high ones."""
        running = {j.job_id for j in view.running}
        for job_id in [j for j in self._preempting if j not in running]:
            del self._preempting[job_id]
        candidates = [j for j in view.running if j.job_id not in self._preempting]
        shown = PoolView(running=candidates)
        for victim in victims(shown, waiting, asked=len(self._preempting)):
            moved = await self.recorder.record(victim.job_id, lambda info: lifecycle.request_preempt(info, at=now()))
            self._preempting[victim.job_id] = time.monotonic()
            if isinstance(moved, Applied):
                log.info("job %s (low) preempted for a job of higher priority", victim.job_id)

    async def _settle_cancelled(self, after: float = 2.0, most: int = 100) -> None:
        """A job cancelled while it waited has no work message, so no worker will publish
        its `cancelled` event if the cancel's own publish failed (a node down): make sure of
        it here, a moment after the cancel, once (the terminal event's Nats-Msg-Id keeps one)."""
        clock = time.monotonic()
        due = [job_id for job_id, seen in self.history.cancelled_waiting.items() if clock - seen >= after][:most]
        for job_id in due:
            found = await self.recorder.jobs.get(job_id)
            if found is not None and found[0].status in TERMINAL:
                await self.recorder.ensure_terminal_event(found[0])
            self.history.cancelled_waiting.pop(job_id, None)

    def _running_on(self, pool: str) -> dict[str, str]:
        """The worker of each running unsharded job, as the job records name it."""
        return {
            j.worker: j.job_id
            for j in self.history.index.live(pool)
            if j.status == "running" and j.worker and j.shards == 1
        }

    def _busy_with(self, worker: WorkerInfo, running_on: dict[str, str]) -> str | None:
        """The job `worker` holds, or None when it is free for the next one. A worker whose
        job's record is terminal is settling it, and fetches the next as soon as it has acked;
        the registry says so only a round trip later, and a round trip after that again that
        it took a new one, whose record already names it: the record is believed first."""
        if worker.worker_id in running_on:
            return running_on[worker.worker_id]
        job_id = worker.current_job
        if not job_id:
            return None
        seen = self.history.index.get(job_id)
        return None if seen is not None and seen.status in TERMINAL else job_id

    async def _admit(self, pool: str, job: JobSummary) -> None:
        moved = await self.recorder.record(job.job_id, lambda info: lifecycle.admit(info, at=now()))
        if not isinstance(moved, Applied):
            return  # another gateway admitted it, or it was cancelled meanwhile
        self._mine[job.job_id] = time.monotonic()
        await self._publish(pool, moved.after)
        self.admitted += 1

    async def _release(self, pool: str, job: JobSummary, active: int) -> bool:
        """Release `job`'s held pieces up to `active` queued or running, then publish them."""
        moved = await self.recorder.record(job.job_id, lambda info: sharding.release(info, active, at=now()))
        if not isinstance(moved, Applied):
            return False  # released by another gateway, or the job ended meanwhile
        after = moved.after.pieces
        self._releasing[job.job_id] = sum(1 for p in after if p.status == "held")
        for before, piece in zip(moved.before.pieces, after, strict=True):
            if before.status == "held" and piece.status == "queued":
                try:
                    await self._publish_piece(pool, job.job_id, piece.index)
                except Exception as exc:  # released in the record: the repair publishes it
                    log.warning("job %s: piece %d released, its message not sent yet: %s", job.job_id, piece.index, exc)
        return True

    async def _publish_piece(self, pool: str, job_id: str, index: int) -> None:
        item = PieceItem(job_id=job_id, step="piece", index=index)
        await jetstream.publish(self.nc, sharding.piece_write(self.topology, pool, item), timeout=self.timeout)

    async def _publish(self, pool: str, info: JobInfo) -> None:
        if info.request is None:
            return  # a record that fails today's rules: a worker could not run it either
        job_id = info.job_id
        write = jetstream.Write(
            self.topology.work_subject(pool, job_id),
            encode(WorkItem(job_id=job_id, request=info.request, created_at=info.created_at)),
            # A job admitted again after a preemption is a new message, not a duplicate.
            {"Nats-Msg-Id": job_id if not info.preemptions else f"{job_id}.{info.preemptions}"},
            stream=self.topology.work_stream(pool),
        )
        await jetstream.publish(self.nc, write, timeout=self.timeout)

    async def _repair(self, pool: str, admitted: list[JobSummary]) -> None:
        """Publish again the message of an admitted job whose admitting gateway died first."""
        for job in self._due(self._checked, admitted):
            try:
                await self.js.get_last_msg(
                    self.topology.work_stream(pool), self.topology.work_subject(pool, job.job_id)
                )
            except NotFoundError:
                found = await self.recorder.jobs.get(job.job_id)
                if found is not None and found[0].status == "queued":
                    log.warning("job %s was admitted but its work message is missing; publishing it again", job.job_id)
                    await self._publish(pool, found[0])

    def _due(self, checked: dict[str, float], jobs: list[JobSummary]) -> list[JobSummary]:
        """The jobs last looked up `repair_after` ago or more (a job first seen now counts from
        now), marked looked up now; `checked` forgets the jobs no longer listed."""
        clock = time.monotonic()
        due = []
        for job in jobs:
            if clock - checked.setdefault(job.job_id, clock) >= self.repair_after:
                checked[job.job_id] = clock
                due.append(job)
        live = {j.job_id for j in jobs}
        for job_id in [j for j in checked if j not in live]:
            del checked[job_id]
        return due

    async def _repair_pieces(self, pool: str, jobs: list[JobSummary]) -> None:
        """Publish again the released pieces (`released_at`) whose releasing gateway died
        before their messages went out (a message that is there is not published twice: its
        id is the same). The planner's own pieces are its message's to repair."""
        for job in self._due(self._pieces_checked, jobs):
            found = await self.recorder.jobs.get(job.job_id)
            if found is None or found[0].status != "running":
                continue
            for piece in found[0].pieces:
                if piece.status != "queued" or piece.released_at is None:
                    continue
                subject = self.topology.piece_subject(pool, job.job_id, str(piece.index))
                try:
                    await self.js.get_last_msg(self.topology.pieces_stream(pool), subject)
                except NotFoundError:
                    log.warning("job %s: piece %d was released with no message; publishing it", job.job_id, piece.index)
                    await self._publish_piece(pool, job.job_id, piece.index)
