"""The gatekeeper: a verdict on every completed job that names a gate, and the `gate` endpoint.

Policies are stored by team and name in the gates bucket (`<team>.<name>`): a team's jobs
are judged by its own policies, and no other team can change them. The gatekeeper runs in
every gateway and follows the same history index: a completed job whose request names a
gate and whose record has no verdict is judged (gates.py) from its metrics and logged
samples and its baseline's, read from the results store. The verdict goes into the record
with a compare-and-set (`lifecycle.judge`: of two gateways one wins) and out as a `gated`
event (`Nats-Msg-Id: <job_id>.gated`). docs/DESIGN.md, "Gates".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from nats.micro.request import Request

from .. import jetstream, lifecycle
from ..errors import InvalidField, JobNotFound
from ..gates import Scores, judge, parse_samples, pick_baseline, samples_task
from ..lifecycle import Applied, Recorder
from ..schemas import (
    JOBS_PAGE_MAX,
    GateCheck,
    GateGet,
    GateList,
    GatePolicy,
    GateSet,
    GatesReply,
    JobInfo,
    JobsQuery,
    RuleOutcome,
    Verdict,
    decode,
    decode_gate_op,
    encode,
    now,
)
from ..topology import Topology
from .history import History
from .identity import of_request

__all__ = ["Gatekeeper"]

log = logging.getLogger("evalq.gateway")

# A samples file larger than this is not read: the rule lacks its per-document evidence.
SAMPLES_MAX_BYTES = 256 << 20


class Gatekeeper:
    """Judges completed jobs while its gateway serves (`start`, `stop`); serves `gate`."""

    def __init__(
        self,
        js: JetStreamContext,
        api: jetstream.Api,
        topology: Topology,
        *,
        history: History,
        recorder: Recorder,
        retry: float = 5.0,
    ) -> None:
        self.js = js
        self.api = api
        self.topology = topology
        self.history = history
        self.recorder = recorder
        self.retry = retry
        self.kv: KeyValue | None = None
        self._failed: dict[str, float] = {}  # job id -> when its judging last failed
        self._unannounced: dict[str, JobInfo] = {}  # judged, their `gated` event not yet out
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Gatekeeper:
        self.kv = await self.js.key_value(self.topology.gates_bucket)
        self._task = asyncio.create_task(self._run(), name="gatekeeper")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)

    # --- policies ---------------------------------------------------------------------

    async def policy(self, team: str, name: str) -> GatePolicy | None:
        assert self.kv is not None
        try:
            entry = await self.kv.get(f"{team}.{name}")
        except KeyNotFoundError:
            return None
        return decode(entry.value or b"", GatePolicy) if entry.value else None

    async def require(self, team: str, name: str | None) -> None:
        """A submission's gate must be one of its team's stored policies."""
        if name is not None and await self.policy(team, name) is None:
            raise InvalidField(f"no gate policy named {name!r}; `evalq gate set {name} FILE` stores one", path="$.gate")

    async def _policies(self, team: str) -> dict[str, GatePolicy]:
        assert self.kv is not None
        found: dict[str, GatePolicy] = {}
        with contextlib.suppress(NoKeysError):
            for key in await self.kv.keys():
                owner, _, name = key.partition(".")
                if owner == team and (policy := await self.policy(team, name)) is not None:
                    found[name] = policy
        return dict(sorted(found.items()))

    # --- the endpoint ------------------------------------------------------------------

    async def serve(self, request: Request) -> GatesReply | Verdict:
        op = decode_gate_op(request.data or b"{}")
        team = of_request(request).team
        if isinstance(op, GateSet):
            assert self.kv is not None
            await self.kv.put(f"{team}.{op.name}", encode(op.policy))
            return GatesReply(policies={op.name: op.policy})
        if isinstance(op, GateGet):
            policy = await self.policy(team, op.name)
            if policy is None:
                raise InvalidField(f"no gate policy named {op.name!r}", path="$.name")
            return GatesReply(policies={op.name: policy})
        if isinstance(op, GateList):
            return GatesReply(policies=await self._policies(team))
        assert isinstance(op, GateCheck)
        return await self._check(op, request)

    async def _check(self, op: GateCheck, request: Request) -> Verdict:
        found = await self.recorder.jobs.get(op.job_id)
        if found is None or not of_request(request).may_see(found[0].team):
            raise JobNotFound(f"no job {op.job_id}", path="$.job_id")
        info = found[0]
        if op.policy is None and op.baseline is None and info.verdict is not None:
            return info.verdict
        if info.status != "completed":
            raise InvalidField(f"job {op.job_id} is {info.status}; only a completed job is judged", path="$.job_id")
        name = op.policy or (info.request.gate if info.request else None)
        if name is None:
            raise InvalidField("the job names no gate: name a policy", path="$.policy")
        policy = await self.policy(info.team, name)
        if policy is None:
            raise InvalidField(f"no gate policy named {name!r}", path="$.policy")
        if op.baseline is not None:
            policy = msgspec.structs.replace(policy, baseline=op.baseline)
        return await self.verdict(info, policy, name)

    # --- judging -----------------------------------------------------------------------

    async def verdict(self, info: JobInfo, policy: GatePolicy, name: str) -> Verdict:
        """`info`'s verdict under `policy` (stored as `name`)."""
        baseline: JobInfo | None = None
        ref = policy.baseline
        if ref in ("previous", "best"):
            summary = self.history.index.get(info.job_id)
            if summary is not None:
                run = {k: info.labels[k] for k in policy.run_labels if k in info.labels}
                # The team's own jobs only: another team's is no evidence this team may read.
                query = JobsQuery(
                    status=["completed"],
                    pool=info.pool,
                    team=info.team,
                    labels=run,
                    metrics=[policy.rules[0].metric],
                    limit=JOBS_PAGE_MAX,
                )
                chosen = pick_baseline(policy, summary, self.history.index.page(query).jobs)
                if chosen is not None:
                    baseline = await self._record(chosen.job_id)
        elif ref is not None:
            baseline = await self._record(ref)
            if baseline is not None and (baseline.team != info.team or baseline.status != "completed"):
                baseline = None  # another team's job is not evidence this team may read
        tasks = {rule.metric.partition("/")[0] for rule in policy.rules}
        mine = await self._scores(info, tasks)
        theirs = await self._scores(baseline, tasks) if baseline is not None else None
        verdict = judge(policy, mine, theirs, name=name)
        if ref is not None and ref not in ("previous", "best") and theirs is None:
            outcomes = [
                msgspec.structs.replace(o, reason=f"{o.reason}: no completed job {ref} of this team")
                if o.reason == "no baseline job"
                else o
                for o in verdict.rules
            ]
            verdict = msgspec.structs.replace(verdict, rules=outcomes)
        return verdict

    async def _record(self, job_id: str) -> JobInfo | None:
        found = await self.recorder.jobs.get(job_id)
        return found[0] if found else None

    async def _scores(self, info: JobInfo, tasks: set[str]) -> Scores:
        metrics = info.result.metrics if info.result else {}
        samples: dict[str, dict[int, dict[str, object]]] = {}
        for name in info.result.artifacts if info.result else []:
            task = samples_task(name)
            if task not in tasks or task is None:
                continue
            meta = await jetstream.object_info(self.api, self.topology.results_bucket, name)
            if meta is None or (meta.size or 0) > SAMPLES_MAX_BYTES:
                continue
            data = await jetstream.read_object(self.api, self.topology.results_bucket, name)
            if data is not None:
                samples.setdefault(task, {}).update(parse_samples(data.decode(errors="replace").splitlines()))
        return Scores(info.job_id, metrics, samples)

    async def _judge(self, job_id: str) -> None:
        info = await self._record(job_id)
        if info is None or info.status != "completed" or info.request is None or info.request.gate is None:
            return
        if info.verdict is not None:
            # Judged already (by another gateway, or by this one whose event did not go out):
            # the event is published again; its message id keeps one in the stream.
            self._unannounced[job_id] = info
            return
        name = info.request.gate
        policy = await self.policy(info.team, name)
        if policy is None:
            missing = RuleOutcome(
                metric="*", tier="critical", status="MISSING", reason=f"no gate policy named {name!r}"
            )
            verdict = Verdict(verdict="INCONCLUSIVE", policy=name, rules=[missing], at=now())
        else:
            verdict = await self.verdict(info, policy, name)
        moved = await self.recorder.record(job_id, lambda current: lifecycle.judge(current, verdict))
        if isinstance(moved, Applied):
            log.info("job %s: %s under gate %s", job_id, verdict.verdict, name)
            self._unannounced[job_id] = moved.after
        elif moved.current is not None and moved.current.verdict is not None:
            self._unannounced[job_id] = moved.current

    async def _announce(self) -> None:
        """Publish the `gated` event of each job judged whose event has not gone out yet; one
        that fails stays, to be tried again: a verdict is never left without its event."""
        for job_id, info in list(self._unannounced.items()):
            try:
                await self.recorder.events.publish(lifecycle.gated_event(info))
            except Exception as exc:
                log.warning("job %s: its gated event could not be published (%s); tried again", job_id, exc)
                continue
            self._unannounced.pop(job_id, None)

    async def _run(self) -> None:
        await self.history.loaded.wait()
        while True:
            self.history.gates_due.clear()
            clock = time.monotonic()
            for job_id in list(self.history.ungated):
                if clock - self._failed.get(job_id, -self.retry) < self.retry:
                    continue
                try:
                    await self._judge(job_id)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # an outage, a store that lost an artifact: tried again
                    log.warning("job %s: its gate's verdict could not be made: %s", job_id, exc)
                    self._failed[job_id] = clock
                    continue
                self.history.ungated.pop(job_id, None)
                self._failed.pop(job_id, None)
            await self._announce()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.history.gates_due.wait(), self.retry)
