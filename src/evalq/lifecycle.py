"""The job lifecycle: every state a job can be in, every change between them, and the one
function that records a change. This is where a job's terminal state is written.

::

    enqueue ──> queued ──admit──> queued ──start──> running ──finish──> completed | failed | cancelled
                  │  ^              │  │ ^
                  │  └──requeue─────┘  │ └─ start (redelivered), progress
                  │                    └──request_cancel──> cancelling ──finish──> cancelled
                  ├──request_cancel──> cancelled
                  └──finish──> completed | failed | cancelled   (gave up, or cancelled before it ran)

    completed ──judge──> completed   (its gate's verdict, once)

Each change is a pure function ``JobInfo -> JobInfo | None``: the next record, or None when
the current state does not allow it (`ALLOWED` is the table they all consult). A sharded
job's pieces change the same way (`sharding.py`: `PIECE_ALLOWED`, `piece_start`, ...). `Recorder`
applies one with a compare-and-set on the record, publishes the event it implies under its
``Nats-Msg-Id``, and, when the record turns out to be terminal already, publishes that
terminal event if it is missing. Two writers (the gateway cancelling, a worker finishing)
can race: the compare-and-set lets exactly one of them make the record terminal, and the
stream's deduplication keeps its event to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypedDict, TypeVar, Union

import msgspec
from nats.js.errors import NotFoundError

from .events import EventPublisher
from .jobstore import JobStore
from .outage import outlast
from .schemas import (
    TERMINAL,
    Cancelled,
    Completed,
    EvaluateRequest,
    Event,
    Failed,
    Gated,
    JobInfo,
    JobResult,
    JobStatus,
    Progress,
    ProgressEvent,
    Queued,
    Requeued,
    ShardCompleted,
    ShardFailed,
    ShardStarted,
    Stalled,
    Started,
    Verdict,
)
from .sharding import pieces_running

__all__ = [
    "ALLOWED",
    "TERMINAL",
    "Applied",
    "Cancellation",
    "Event",
    "Failure",
    "Outcome",
    "Recorder",
    "Refused",
    "Success",
    "Transition",
    "admit",
    "allowed",
    "enqueue",
    "finish",
    "gated_event",
    "judge",
    "outcome_status",
    "pieces_running",  # sharding's, read here by the gateway
    "preempt",
    "progress",
    "progress_event",
    "queued_event",
    "request_cancel",
    "request_preempt",
    "requeue",
    "requeued_event",
    "shard_completed_event",
    "shard_failed_event",
    "shard_started_event",
    "stall",
    "stalled_event",
    "start",
    "started_event",
    "terminal_event",
]

log = logging.getLogger("evalq.lifecycle")

Transition = Literal[
    "admit", "start", "progress", "stall", "request_cancel", "finish", "requeue", "request_preempt", "preempt", "judge"
]
STATES: tuple[JobStatus, ...] = ("queued", "running", "cancelling", "completed", "failed", "cancelled")
TRANSITIONS: tuple[Transition, ...] = (
    "admit",
    "start",
    "progress",
    "stall",
    "request_cancel",
    "finish",
    "requeue",
    "request_preempt",
    "preempt",
    "judge",
)

# (state, transition) -> the states it may lead to. A pair that is absent is refused.
ALLOWED: dict[tuple[JobStatus, Transition], frozenset[JobStatus]] = {
    # The scheduler lets it into its pool's work stream (gateway/dispatcher.py).
    ("queued", "admit"): frozenset({"queued"}),
    ("queued", "start"): frozenset({"running"}),
    # A redelivery: the worker that held it stopped answering.
    ("running", "start"): frozenset({"running"}),
    ("running", "progress"): frozenset({"running"}),
    # Its progress has not moved for the pool's `stall_after_s`: marked, still running.
    ("running", "stall"): frozenset({"running"}),
    ("queued", "request_cancel"): frozenset({"cancelled"}),
    ("running", "request_cancel"): frozenset({"cancelling"}),
    # From queued: a job that used up its attempts, or whose output folder is unusable.
    ("queued", "finish"): frozenset({"completed", "failed", "cancelled"}),
    ("running", "finish"): frozenset({"completed", "failed", "cancelled"}),
    # An evaluation that ended on its own before the cancel reached it keeps its outcome.
    ("cancelling", "finish"): frozenset({"completed", "failed", "cancelled"}),
    ("running", "requeue"): frozenset({"queued"}),
    # A waiting job of higher priority needs its worker (gateway/dispatcher.py): marked once,
    # then its worker stops it at once and hands it back to wait for its turn again.
    ("running", "request_preempt"): frozenset({"running"}),
    ("running", "preempt"): frozenset({"queued"}),
    # Its gate's verdict (gateway/gatekeeper.py), written once.
    ("completed", "judge"): frozenset({"completed"}),
}


def allowed(state: str, transition: Transition) -> frozenset[JobStatus]:
    """The states `transition` may lead to from `state`; empty when it is refused."""
    return ALLOWED.get((state, transition), frozenset())  # type: ignore[arg-type]


# --- outcomes: how an evaluation ended -----------------------------------------------


class Success(msgspec.Struct, frozen=True, kw_only=True, tag_field="outcome", tag="completed"):
    result: JobResult


class Failure(msgspec.Struct, frozen=True, kw_only=True, tag_field="outcome", tag="failed"):
    error: str
    exit_code: int | None = None
    log_tail: str | None = None


class Cancellation(msgspec.Struct, frozen=True, kw_only=True, tag_field="outcome", tag="cancelled"):
    reason: str
    # From the cancel request to the end of the evaluation's processes, when it was running.
    latency_s: float | None = None


Outcome = Union[Success, Failure, Cancellation]


def outcome_status(outcome: Outcome) -> JobStatus:
    return outcome.__struct_config__.tag  # type: ignore[return-value]


# --- the changes, as pure functions ----------------------------------------------------


def enqueue(
    job_id: str,
    request: EvaluateRequest,
    *,
    created_at: str,
    stream_seq: int | None,
    team: str = "default",
    user: str | None = None,
) -> JobInfo:
    """The first record of a job; `team` and `user` are whom the server says sent it."""
    return JobInfo(
        job_id=job_id,
        status="queued",
        created_at=created_at,
        request=request,
        stream_seq=stream_seq,
        labels=request.labels,
        pool=request.pool,
        shards=request.shards,
        team=team,
        user=user,
    )


def admit(info: JobInfo, *, at: str) -> JobInfo | None:
    """Let it into the work stream; refused once admitted (another dispatcher was first)."""
    if not allowed(info.status, "admit") or info.admitted_at is not None:
        return None
    return msgspec.structs.replace(info, admitted_at=at)


def start(info: JobInfo, *, attempt: int, worker: str, at: str) -> JobInfo | None:
    if not allowed(info.status, "start"):
        return None
    return msgspec.structs.replace(
        info, status="running", attempts=attempt, worker=worker, started_at=at, progress=None, stalled_since=None
    )


def progress(info: JobInfo, value: Progress) -> JobInfo | None:
    """Progress recorded; one that moved takes a stall mark off."""
    if not allowed(info.status, "progress"):
        return None
    moved = info.progress is None or (value.phase, value.done) != (info.progress.phase, info.progress.done)
    return msgspec.structs.replace(info, progress=value, stalled_since=None if moved else info.stalled_since)


def stall(info: JobInfo, *, since: str) -> JobInfo | None:
    """Its progress has not moved since `since`: marked, once (a job marked already is left as it is)."""
    if not allowed(info.status, "stall") or info.stalled_since is not None:
        return None
    return msgspec.structs.replace(info, stalled_since=since)


def request_cancel(info: JobInfo, *, at: str) -> JobInfo | None:
    """Queued: cancelled at once. Running: `cancelling`, and the worker's watcher ends it."""
    targets = allowed(info.status, "request_cancel")
    if "cancelled" in targets:
        return msgspec.structs.replace(
            info, status="cancelled", completed_at=at, cancel_requested_at=at, error="cancelled while queued"
        )
    if "cancelling" in targets:
        # A sharded job's pieces that wait are cancelled with it; those running stop on
        # their own (their workers watch the record).
        pieces = [
            msgspec.structs.replace(p, status="cancelled", completed_at=at) if p.status in ("queued", "held") else p
            for p in info.pieces
        ]
        return msgspec.structs.replace(info, status="cancelling", cancel_requested_at=at, pieces=pieces)
    return None


def finish(info: JobInfo, outcome: Outcome, *, at: str) -> JobInfo | None:
    status = outcome_status(outcome)
    if status not in allowed(info.status, "finish"):
        return None
    match outcome:
        case Success(result=result):
            return msgspec.structs.replace(info, status=status, completed_at=at, result=result, error=None)
        case Failure(error=error):
            return msgspec.structs.replace(info, status=status, completed_at=at, result=None, error=error)
        case Cancellation(reason=reason):
            return msgspec.structs.replace(info, status=status, completed_at=at, result=None, error=reason or None)
    return None  # pragma: no cover - the match is exhaustive


def request_preempt(info: JobInfo, *, at: str) -> JobInfo | None:
    """Ask its worker to give it up; refused once asked, and for a sharded job (its pieces
    yield between pieces instead)."""
    if not allowed(info.status, "request_preempt") or info.preempt_requested_at is not None or info.shards > 1:
        return None
    return msgspec.structs.replace(info, preempt_requested_at=at)


def preempt(info: JobInfo) -> JobInfo | None:
    """Back to waiting for the scheduler (no longer admitted); its journal keeps its work."""
    if not allowed(info.status, "preempt"):
        return None
    return msgspec.structs.replace(
        info,
        status="queued",
        worker=None,
        progress=None,
        admitted_at=None,
        stream_seq=None,  # its message is gone: it waits as a record again
        preempt_requested_at=None,
        preemptions=info.preemptions + 1,
    )


def judge(info: JobInfo, verdict: Verdict) -> JobInfo | None:
    """Record its gate's verdict; refused once it has one (another gateway was first)."""
    if not allowed(info.status, "judge") or info.verdict is not None:
        return None
    return msgspec.structs.replace(info, verdict=verdict)


def requeue(info: JobInfo) -> JobInfo | None:
    if not allowed(info.status, "requeue"):
        return None
    return msgspec.structs.replace(info, status="queued", worker=None, progress=None)


# --- the events each change implies --------------------------------------------------


class _Common(TypedDict):
    """What every event says: whose, when, which attempt, which worker, the job's labels and team."""

    job_id: str
    time: str
    attempt: int
    worker: str | None
    labels: dict[str, str]
    team: str


def _common(info: JobInfo, *, at: str, attempt: int = 0, worker: str | None = None) -> _Common:
    return _Common(job_id=info.job_id, time=at, attempt=attempt, worker=worker, labels=info.labels, team=info.team)


def queued_event(info: JobInfo) -> Queued:
    return Queued(**_common(info, at=info.created_at), pool=info.pool, stream_seq=info.stream_seq)


def terminal_event(info: JobInfo, outcome: Outcome | None = None, *, worker: str | None = None) -> Event:
    """The terminal event of a terminal record; `outcome` adds what only its writer knew."""
    common = _common(info, at=info.completed_at or info.created_at, attempt=info.attempts, worker=worker)
    if info.status == "completed":
        result = info.result or JobResult()
        return Completed(
            **common, metrics=result.metrics, artifacts=result.artifacts, duration_s=result.duration_s, work=result.work
        )
    if info.status == "failed":
        failure = outcome if isinstance(outcome, Failure) else Failure(error=info.error or "failed")
        return Failed(
            **common, error=info.error or failure.error, exit_code=failure.exit_code, log_tail=failure.log_tail
        )
    reason = outcome.reason if isinstance(outcome, Cancellation) else (info.error or "cancelled")
    latency = outcome.latency_s if isinstance(outcome, Cancellation) else None
    return Cancelled(**common, reason=reason, cancel_latency_s=latency)


def started_event(
    info: JobInfo,
    *,
    worker: str,
    at: str,
    model_reused: bool | None = None,
    model_load_seconds: float | None = None,
    weights_swapped: bool | None = None,
    model_note: str | None = None,
    resumed_responses: int = 0,
    resumed_scores: int = 0,
    loads_model: bool = True,
) -> Started:
    return Started(
        **_common(info, at=at, attempt=info.attempts, worker=worker),
        model_reused=model_reused,
        model_load_seconds=model_load_seconds,
        weights_swapped=weights_swapped,
        model_note=model_note,
        resumed_responses=resumed_responses,
        resumed_scores=resumed_scores,
        loads_model=loads_model,
    )


def gated_event(info: JobInfo) -> Gated:
    assert info.verdict is not None
    return Gated(**_common(info, at=info.verdict.at, attempt=info.attempts, worker=info.worker), verdict=info.verdict)


def progress_event(info: JobInfo, value: Progress, *, worker: str, at: str) -> ProgressEvent:
    return ProgressEvent(**_common(info, at=at, attempt=info.attempts, worker=worker), progress=value)


def stalled_event(info: JobInfo, *, worker: str, at: str, seconds: float, action: str) -> Stalled:
    assert info.stalled_since is not None
    return Stalled(
        **_common(info, at=at, attempt=info.attempts, worker=worker),
        since=info.stalled_since,
        seconds=round(seconds, 3),
        action="fail" if action == "fail" else "report",
    )


def requeued_event(info: JobInfo, *, attempt: int, worker: str, reason: str, at: str) -> Requeued:
    return Requeued(**_common(info, at=at, attempt=attempt, worker=worker), reason=reason)


def shard_started_event(info: JobInfo, index: int, *, worker: str, at: str) -> ShardStarted:
    attempt = info.pieces[index].attempts
    return ShardStarted(**_common(info, at=at, attempt=attempt, worker=worker), shard=index, shards=len(info.pieces))


def shard_completed_event(info: JobInfo, index: int, *, worker: str, at: str) -> ShardCompleted:
    piece = info.pieces[index]
    return ShardCompleted(
        **_common(info, at=at, attempt=piece.attempts, worker=worker), shard=index, seconds=piece.seconds
    )


def shard_failed_event(info: JobInfo, index: int, *, attempt: int, worker: str, error: str, at: str) -> ShardFailed:
    return ShardFailed(**_common(info, at=at, attempt=attempt, worker=worker), shard=index, error=error)


# --- recording ------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """The change was written: the record before and after it."""

    before: JobInfo
    after: JobInfo


@dataclass(frozen=True)
class Refused:
    """The change was not allowed; `current` is the record as it is (None: there is none)."""

    current: JobInfo | None


Change = Callable[[JobInfo], JobInfo | None]
T = TypeVar("T")


class Recorder:
    """Applies lifecycle changes to the jobs bucket and publishes the events they imply.

    `patience`, when given, is how long a step that meets a NATS outage is retried: a
    worker's outcome is worth hours of GPU time, so it waits out a server restart; the
    gateway answers 503 at once instead.
    """

    def __init__(self, jobs: JobStore, events: EventPublisher, *, patience: float | None = None) -> None:
        self.jobs = jobs
        self.events = events
        self.patience = patience

    async def _step(self, step: Callable[[], Awaitable[T]], what: str, patient: bool) -> T:
        if patient and self.patience:
            return await outlast(step, what, self.patience)
        return await step()

    async def record(
        self,
        job_id: str,
        change: Change,
        event: Callable[[Applied], Event | None] | None = None,
        *,
        patient: bool = False,
        repair: bool = False,
    ) -> Applied | Refused:
        """Compare-and-set `change` on the record; publish `event(applied)`; repair a terminal one.

        With `repair`, when the record is terminal and the change refused, the terminal event
        is published if the stream lacks it (a writer that died between the two). Only a
        holder of the job's work message repairs: the writer of a terminal record publishes
        its event before it lets the message go, so a missing event is found by whoever
        takes the message next, and nobody races the writer's own, fuller event. Raises when
        the event cannot be published: the caller must not ack the work message then, so
        that its redelivery comes back here.
        """
        moved = await self._step(lambda: self.jobs.transition(job_id, change), "record the change", patient)
        if moved is None:
            found = await self._step(lambda: self.jobs.get(job_id), "read the record", patient)
            current = found[0] if found else None
            if repair and current is not None and current.status in TERMINAL:
                await self.ensure_terminal_event(current, patient=patient)
            return Refused(current)
        applied = Applied(*moved)
        published = event(applied) if event is not None else None
        if published is not None:
            await self._step(lambda: self.events.publish(published), "publish the event", patient)
        return applied

    async def finish(
        self, job_id: str, outcome: Outcome, *, at: str, worker: str | None, patient: bool = True
    ) -> Applied | Refused:
        """Record a terminal outcome and publish its event (with the outcome's details when
        this call wrote it, or when an earlier write of the same outcome timed out yet landed)."""

        def event(applied: Applied) -> Event:
            return terminal_event(applied.after, outcome, worker=worker)

        done = await self.record(job_id, lambda info: finish(info, outcome, at=at), event, patient=patient)
        if isinstance(done, Refused) and done.current is not None and done.current.status in TERMINAL:
            record = done.current
            # Ours when a write that timed out had in fact landed: its event keeps the details.
            ours = record.completed_at == at and record.status == outcome_status(outcome)
            await self.ensure_terminal_event(record, outcome if ours else None, worker=worker, patient=patient)
        return done

    async def end_cancelled_if_idle(self, job_id: str, *, at: str) -> None:
        """A sharded job being cancelled ends once none of its pieces runs. Each party that
        stops a piece (or asks for the cancel) writes its change first, then looks: whoever
        looks last sees no piece running and records the end, once."""
        found = await self._step(lambda: self.jobs.get(job_id), "read the record", True)
        if found is None:
            return
        record = found[0]
        if record.status == "cancelling" and record.pieces and not pieces_running(record):
            await self.finish(job_id, Cancellation(reason="cancelled while running"), at=at, worker=None)

    async def ensure_terminal_event(
        self, info: JobInfo, outcome: Outcome | None = None, *, worker: str | None = None, patient: bool = False
    ) -> None:
        """Publish a terminal record's event unless the stream has one already.

        Raises when it cannot look or publish, so that the caller leaves the message unacked.
        """
        for kind in sorted(TERMINAL):
            if await self._has_event(info, kind, patient):
                return
        missing = terminal_event(info, outcome, worker=worker or info.worker)
        await self._step(lambda: self.events.publish(missing), "publish the outcome", patient)

    async def ensure_queued_event(self, info: JobInfo, *, bound: float) -> None:
        """Publish the `queued` event if the stream lacks it, so that `started` never precedes it.

        The gateway sends the event and the record side by side; a gateway that died between
        them leaves a record without its event. Bounded: during an outage a job must not wait
        here so long that it is redelivered to another worker. Best effort: a lookup that fails
        leaves the order to the gateway.
        """
        try:
            found = await asyncio.wait_for(self._has_event(info, "queued", False), bound)
        except Exception as exc:
            log.warning("could not look for the queued event of %s: %s", info.job_id, exc)
            return
        if not found:
            with contextlib.suppress(Exception):
                await self.events.publish(queued_event(info))

    async def announce(self, event: Event) -> bool:
        """Publish an event that records no change (`started` once the process exists, a
        redelivery's `requeued`); best effort: a follower misses it, nothing else does."""
        try:
            await self.events.publish(event)
        except Exception as exc:
            log.warning("could not publish %s for %s: %s", type(event).__name__, event.job_id, exc)
            return False
        return True

    async def _has_event(self, info: JobInfo, kind: str, patient: bool) -> bool:
        subject = self.events.topology.event_subject(info.job_id, kind, team=info.team)
        stream = self.events.topology.events_stream

        async def look() -> bool:
            try:
                await self.events.js.get_last_msg(stream, subject)
            except NotFoundError:
                return False
            return True

        return await self._step(look, f"look for the {kind} event", patient)
