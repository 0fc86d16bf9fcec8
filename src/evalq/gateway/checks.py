"""What a submit is held to before anything is written: its size, its shape, its pool, the
job it re-scores, the live workers and the pool's policy (docs/DESIGN.md, "What the gateway
does"). Each refusal carries the JSON path of what it refuses."""

from __future__ import annotations

from nats.js import JetStreamContext

from ..errors import InvalidField, JobNotFound, QuotaExceeded, TooLarge, WrongState
from ..jobstore import JobStore
from ..policy import Policies
from ..policy import check as check_policy
from ..registry import Registry
from ..scheduling import rank
from ..schemas import EvaluateRequest, decode
from ..topology import Topology
from .identity import Requester

__all__ = ["PoolNames", "SubmitChecks"]


class PoolNames:
    """The pools this gateway has seen. A name it does not know is looked up before it is
    refused: a worker may have created its pool since the last look."""

    def __init__(self, topology: Topology, js: JetStreamContext) -> None:
        self.topology = topology
        self.js = js
        self._seen: set[str] = set()

    async def load(self) -> None:
        self._seen = set(await self.topology.pools(self.js))

    async def known(self) -> list[str]:
        self._seen |= set(await self.topology.pools(self.js))
        return sorted(self._seen)

    async def check(self, pool: str) -> None:
        if pool in self._seen:
            return
        if await self.topology.has_pool(self.js, pool):
            self._seen.add(pool)
            return
        known = await self.topology.pools(self.js)
        self._seen = set(known)
        raise InvalidField(
            f"unknown pool {pool!r}; known pools: {', '.join(known) or 'none'} "
            "(a worker creates its pool when it starts)",
            path="$.pool",
        )


class SubmitChecks:
    """Turns a submit's body into the request to enqueue, or raises the refusal it deserves."""

    def __init__(
        self, *, max_bytes: int, pools: PoolNames, jobs: JobStore, registry: Registry, policies: Policies
    ) -> None:
        self.max_bytes = max_bytes
        self.pools = pools
        self.jobs = jobs
        self.registry = registry
        self.policies = policies

    async def request(self, data: bytes, asker: Requester) -> EvaluateRequest:
        if len(data) > self.max_bytes:
            raise TooLarge(f"request body is {len(data)} bytes; the limit is {self.max_bytes}")
        job = decode(data, EvaluateRequest)
        await self.pools.check(job.pool)
        await self.rescore(job, asker)
        await self.registry.check(job)
        check_policy(job, await self.policies.get(job.pool))
        return job

    async def team_limits(self, job: EvaluateRequest, team: str, queued: int) -> None:
        """The team's priority cap and its quota of queued jobs in the request's pool."""
        pool = job.pool
        limits = (await self.policies.get(pool)).scheduling.team(team)
        if rank(job.priority) > rank(limits.max_priority):
            raise InvalidField(
                f"team {team!r} may ask for priority up to {limits.max_priority!r} in pool {pool!r}", path="$.priority"
            )
        if limits.max_queued is not None and queued >= limits.max_queued:
            raise QuotaExceeded(
                f"quota max_queued: team {team!r} has {queued} jobs queued in pool {pool!r}, "
                f"its quota is {limits.max_queued}; retry when some have started"
            )

    async def rescore(self, job: EvaluateRequest, asker: Requester) -> None:
        """A re-score scores again what its source recorded: a source that is missing or has not
        completed has nothing to score, and a task it did not run has no responses. Another
        team's job is no job at all: its responses are not the asker's to score."""
        source_id = job.rescore_of
        if source_id is None:
            return
        found = await self.jobs.get(source_id)
        if found is None or not asker.may_see(found[0].team):
            raise JobNotFound(f"no job {source_id} to re-score", path="$.rescore_of")
        source = found[0]
        if source.status != "completed":
            raise WrongState(
                f"job {source_id} is {source.status}; only a completed job can be re-scored", path="$.rescore_of"
            )
        # A record read without its request (one that held a credential) cannot be compared.
        ran = source.request.tasks if source.request is not None else job.tasks
        for index, task in enumerate(job.tasks):
            if task not in ran:
                raise InvalidField(
                    f"task {task!r} is not among the tasks job {source_id} ran ({', '.join(ran)})",
                    path=f"$.tasks[{index}]",
                )
