"""One evaluation, supervised: the job in hand, its process, and what may end it early.

The worker holds one `RunningJob` at a time: a whole job, or a sharded job's plan, piece
or merge. `Evaluation.run` starts its process (`launch.py` says where) and supervises it
until it ends on its own, the job's record turns `cancelling`, its time limit passes, or
the worker hands it back (a shutdown); each way ends the whole process group. `started`
is announced once the process exists (and, in a resident process, has its model), and
progress is reported only between `started` and the outcome, so that no progress event
precedes the one or follows the other. `Evaluation.outcome` turns how it ended into the
job's `Outcome`, one ladder for a whole job and a merge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg

from .. import lifecycle, sharding
from ..config import Settings
from ..jobstore import JobStore
from ..lifecycle import Applied, Cancellation, Failure, Outcome, Recorder, Success
from ..schemas import TERMINAL, CacheMode, JobInfo, Progress, decode, now
from .argv import lmms_eval_args
from .entry import ENTRY_MODULE
from .identity import model_identity
from .journal_stream import Journal, JournalRun, part_name
from .launch import Launch, Launcher, Process
from .resident import Loaded
from .results import outcome_of, tail, upload
from .settle import Settler
from .warm import ZygoteError

__all__ = ["Evaluation", "RunningJob"]

log = logging.getLogger("evalq.worker")

# Re-scores of re-scores are followed this far back to the job that ran a model.
_MAX_RESCORE_CHAIN = 32


@dataclass
class RunningJob:
    """The job in hand, and why it may have to stop early."""

    info: JobInfo
    msg: Msg
    attempt: int
    process: Process | None = None
    # Seconds the evaluation may run (the job's timeout, or its pool's); None: no limit.
    limit_s: int | None = None
    timed_out: asyncio.Event = field(default_factory=asyncio.Event)
    # Seconds without progress after which the job is stalled, and what that does (its pool's
    # policy); None: never. A sharded job's pieces are not watched: their plan and merge
    # steps report no progress of their own.
    stall_after_s: int | None = None
    stall_action: str = "report"
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    # When its progress last moved (monotonic, and as a timestamp for the record).
    moved_at: float = 0.0
    moved_stamp: str = ""
    cancel_requested_at: float | None = None
    launch_error: str = ""
    # The piece of a sharded job this evaluation runs (None: the whole job, or its plan or merge).
    piece: int | None = None
    # A sharded job's plan and merge steps report no progress: the job's progress counts
    # the documents its pieces answered.
    quiet: bool = False
    # What the resident model said for this job; None: no resident.
    model: Loaded | None = None
    # How the job uses the response cache (its own `cache`, else its pool's default).
    cache: CacheMode = "off"
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    requeue: asyncio.Event = field(default_factory=asyncio.Event)
    # Handed back because a job of higher priority needs this worker (not a shutdown).
    preempted: bool = False
    last_progress_at: float = 0.0
    last_phase: str = ""
    # The last (phase, done) seen: progress has moved when it changes.
    position: tuple[str, int] = ("", -1)
    reported: tuple[str, int] = ("", -1)
    # Progress is reported only between `started` and the outcome, so that no progress event
    # precedes the one or follows the other.
    announced: bool = False
    reports: set[asyncio.Task[None]] = field(default_factory=set)


class Evaluation:
    """Runs the evaluation of the job in hand and supervises it to its end."""

    def __init__(
        self,
        settings: Settings,
        launcher: Launcher,
        recorder: Recorder,
        jobs: JobStore,
        settler: Settler,
        journal: Journal,
        *,
        worker_id: str,
        include_dir: Path,
    ) -> None:
        self.settings = settings
        self.launcher = launcher
        self.recorder = recorder
        self.jobs = jobs
        self.settler = settler
        self.journal = journal
        self.worker_id = worker_id
        self.include_dir = include_dir

    async def supervise(self, job: RunningJob) -> None:
        """Run a whole job's evaluation to its end, a cancel, or a hand-back; then settle its message."""
        info = job.info
        assert info.request is not None
        output = self.settler.output_dir(info)
        begun = time.monotonic()
        launched_at = time.time()
        if isinstance(output, str):
            await self.settler.conclude(job.msg, info.job_id, Failure(error=output))
            return
        log_path = output / "eval.log"
        journal = await self.journal_for(job, output, part_name(None))
        if isinstance(journal, str):
            await self.settler.conclude(job.msg, info.job_id, Failure(error=journal))
            return

        async def announce() -> None:
            got = job.model
            event = lifecycle.started_event(
                info,
                worker=self.worker_id,
                at=now(),
                model_reused=None if got is None else got.reused,
                model_load_seconds=None if got is None else got.seconds,
                weights_swapped=None if got is None else got.swapped,
                model_note=None if got is None else got.note,
                resumed_responses=journal.resumed_responses if journal else 0,
                resumed_scores=journal.resumed_scores if journal else 0,
                loads_model=info.request is None or info.request.rescore_of is None,
            )
            await self.recorder.announce(event)

        args = lmms_eval_args(info.request, output_path=output, include_path=self.include_dir)
        if journal is None:
            launch = Launch(args=args, cwd=output, log_path=log_path)
        else:
            # A re-score loads no model: it runs where any evaluation without one runs.
            rescore = info.request.rescore_of is not None
            launch = Launch(
                args=journal.flags() + args,
                cwd=output,
                log_path=log_path,
                module=ENTRY_MODULE,
                per_gpu=not rescore,
                identity=journal.model,
            )
        exit_code = await self.run(job, launch, announce, journal)
        outcome = await self.outcome(
            job, exit_code, output, log_path, duration_s=round(time.monotonic() - begun, 3), started_at=launched_at
        )
        if outcome is None and job.preempted:
            await self.settler.preempt(job.msg, info.job_id, attempt=job.attempt)
            return
        if outcome is None:
            reason = f"worker {self.worker_id} is shutting down"
            await self.settler.requeue(job.msg, info.job_id, attempt=job.attempt, reason=reason)
            return
        outcome = await self.settle_journal(job, journal, outcome, [part_name(None)])
        await self.settler.conclude(job.msg, info.job_id, outcome)

    async def journal_for(self, job: RunningJob, output: Path, part: str) -> JournalRun | str | None:
        """The evaluation's journal, prepared (what it resumes, what the cache holds); None
        where none is kept (a configured evaluator, not lmms-eval); a reason where the job
        cannot run (a re-score whose source has no journal)."""
        request = job.info.request
        assert request is not None
        if self.settings.worker.evaluator:
            return (
                "a re-score needs lmms-eval (this worker runs a configured evaluator)" if request.rescore_of else None
            )
        worker = self.settings.worker
        model = await asyncio.to_thread(model_identity, request, cwd=output)
        origin = await self._origin(request.rescore_of) if request.rescore_of is not None else None
        run = JournalRun(
            self.journal,
            job_id=job.info.job_id,
            part=part,
            model=model,
            directory=output / "journal",
            cache=job.cache,
            settings={
                "flush_count": worker.journal_flush_records,
                "flush_seconds": worker.journal_flush_seconds,
                "seed": request.seed is not None,
            },
            rescore_of=origin,
            interval=min(1.0, worker.journal_flush_seconds),
        )
        try:
            await run.prepare()
        except FileNotFoundError as exc:
            return str(exc)
        except Exception as exc:  # NATS away or the journal unreadable: run without resuming
            if request.rescore_of is not None:
                return f"the journal of job {request.rescore_of} could not be read: {exc}"
            log.warning("job %s: journal not read (%s); computing everything", job.info.job_id, exc)
        return run

    async def _origin(self, source: str) -> str:
        """The job whose journal holds the responses a re-score of `source` reads: `source`,
        or, where it is itself a re-score (its journal holds scores only), its own source."""
        for _ in range(_MAX_RESCORE_CHAIN):
            found = await self.jobs.get(source)
            request = found[0].request if found is not None else None
            if request is None or request.rescore_of is None:
                return source
            source = request.rescore_of
        return source

    async def settle_journal(
        self, job: RunningJob, journal: JournalRun | None, outcome: Outcome, parts: list[str]
    ) -> Outcome:
        """Keep a completed evaluation's journal (and cache its answers), with its work in the
        result; remove a failed or cancelled job's."""
        if journal is None:
            return outcome
        try:
            if isinstance(outcome, Success):
                await journal.completed()
                work = journal.work()
                return msgspec.structs.replace(outcome, result=msgspec.structs.replace(outcome.result, work=work))
            await self.journal.remove(job.info.job_id, parts)
        except Exception as exc:  # the outcome stands; the journal expires on its own
            log.warning("job %s: journal not settled: %s", job.info.job_id, exc)
        return outcome

    async def outcome(
        self,
        job: RunningJob,
        exit_code: int | None,
        output: Path,
        log_path: Path,
        *,
        duration_s: float,
        started_at: float,
        step: str = "evaluation",
    ) -> Outcome | None:
        """How the evaluation ended, as the job's outcome: it could not start, was cancelled,
        ran out of time, or produced results (or none); None when it was handed back."""
        if exit_code is None:
            return Failure(error=f"the {step} could not start: {job.launch_error}")
        if job.cancel.is_set():
            return self.cancellation(job)
        if job.timed_out.is_set():
            return await self.timeout_failure(job, job.info.job_id, log_path, exit_code)
        if job.stalled.is_set():
            reason = (
                f"stalled: its progress had not moved for {job.stall_after_s} s (since {job.moved_stamp}), "
                "and its pool's policy fails a stalled job"
            )
            return await self.stopped_failure(reason, job.info.job_id, log_path, exit_code)
        if job.requeue.is_set():
            return None
        return await outcome_of(
            output,
            log_path,
            exit_code,
            job_id=job.info.job_id,
            put=self.settler.store,
            duration_s=duration_s,
            tail_lines=self.settings.worker.log_tail_lines,
            started_at=started_at,
        )

    def cancellation(self, job: RunningJob) -> Cancellation:
        latency = None
        ended_at = job.process.ended_at if job.process is not None else None
        if job.cancel_requested_at is not None and ended_at is not None:
            latency = round(max(0.0, ended_at - job.cancel_requested_at), 3)
        return Cancellation(reason="cancelled while running", latency_s=latency)

    async def timeout_failure(self, job: RunningJob, object_prefix: str, log_path: Path, exit_code: int) -> Failure:
        reason = f"timeout: the evaluation ran longer than its limit of {job.limit_s} s and was stopped"
        return await self.stopped_failure(reason, object_prefix, log_path, exit_code)

    async def stopped_failure(self, reason: str, object_prefix: str, log_path: Path, exit_code: int) -> Failure:
        """A failure for an evaluation the worker stopped: `reason`, with its log's tail, and the log kept."""
        log_tail = tail(log_path, self.settings.worker.log_tail_lines)
        await upload(self.settler.store, object_prefix, [(log_path, "eval.log")])
        return Failure(error=reason, exit_code=exit_code, log_tail=log_tail)

    async def run(
        self,
        job: RunningJob,
        launch: Launch,
        announce: Callable[[], Awaitable[None]],
        journal: JournalRun | None = None,
    ) -> int | None:
        """Start one evaluation process and supervise it until it ends, is cancelled, runs out
        of time or is handed back (`job` says which); its exit code, or None when it could
        not start (`job.launch_error` says why)."""
        ended = asyncio.Event()
        tailing: asyncio.Task[None] | None = None
        # Follow the record from here on: a launch may wait for the warm evaluator's imports.
        watcher = asyncio.create_task(self._watch_for_cancel(job, ended))
        waiting: asyncio.Task[int] | None = None
        stop_reasons: list[asyncio.Task[Any]] = []
        try:
            try:
                process = await self._launch(job, launch)
            except (OSError, ZygoteError) as exc:
                job.launch_error = str(exc)
                return None
            job.process = process
            waiting = asyncio.create_task(process.wait())
            if journal is not None:
                tailing = asyncio.create_task(journal.tail())
            stop_reasons = [asyncio.create_task(job.cancel.wait()), asyncio.create_task(job.requeue.wait())]
            if job.limit_s is not None:
                stop_reasons.append(asyncio.create_task(self._time_limit(job)))
            # A resident model says once it has the model (loaded or reused): `started` waits
            # for that, while a cancel or the time limit is still heard.
            loading = asyncio.create_task(process.loaded())
            stop_reasons.append(loading)
            await asyncio.wait([loading, waiting, *stop_reasons], return_when=asyncio.FIRST_COMPLETED)
            stop_reasons.remove(loading)
            if not any(task.done() for task in stop_reasons):
                # Started: with its model, or ended before it had one (a model that cannot load).
                got = loading.result() if loading.done() else None
                if got is not None:
                    job.model = got
                # Announced after the launch, so a follower that sees it can act on the process.
                await announce()
                job.announced = True
                if job.stall_after_s is not None and job.piece is None and not job.quiet:
                    self._moved(job)
                    stop_reasons.append(asyncio.create_task(self._stall_watch(job)))
                await asyncio.wait([waiting, *stop_reasons], return_when=asyncio.FIRST_COMPLETED)
            if not loading.done():
                loading.cancel()
            if not waiting.done():
                await process.terminate(self.settings.worker.cancel_grace)
            code = await waiting
            if journal is not None:
                # What the process wrote last (a SIGTERM flushes it) is kept before it is settled.
                with contextlib.suppress(Exception):
                    await journal.publish_new()
            return code
        finally:
            ended.set()
            if tailing is not None:
                tailing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tailing
            job.announced = False
            if job.reports:
                # Each report's requests are bounded by their own timeouts.
                await asyncio.wait(job.reports)
            pending: list[asyncio.Task[Any]] = [watcher, *stop_reasons]
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=10)
            if waiting is not None and not waiting.done():
                if job.process is not None:
                    await job.process.terminate(0.5)
                waiting.cancel()

    async def _launch(self, job: RunningJob, launch: Launch) -> Process:
        request = job.info.request
        assert request is not None

        def on_progress(progress: Progress) -> None:
            self._on_progress(job, progress)

        name = f"job {job.info.job_id} attempt {job.attempt}"
        return await self.launcher.launch(request, launch, on_progress=on_progress, job=name)

    async def _time_limit(self, job: RunningJob) -> None:
        assert job.limit_s is not None
        await asyncio.sleep(job.limit_s)  # the job's time limit itself
        job.timed_out.set()

    async def _watch_for_cancel(self, job: RunningJob, ended: asyncio.Event) -> None:
        """Watch the job's record; a `cancelling` status ends the evaluation."""
        while not ended.is_set():
            watcher = None
            try:
                watcher = await self.jobs.kv.watch(job.info.job_id)
                # Setting up a watch can swallow a cancellation: look again before waiting on it.
                if ended.is_set():
                    return
                async for entry in watcher:
                    if entry is None or not entry.value:
                        continue
                    record = decode(entry.value, JobInfo)
                    # A piece also stops when its job ended without it (another piece failed).
                    if record.status == "cancelling" or (job.piece is not None and record.status in TERMINAL):
                        job.cancel_requested_at = asyncio.get_running_loop().time()
                        job.cancel.set()
                        return
                    if record.preempt_requested_at is not None and job.piece is None:
                        # Stopped as a shutdown stops it (its journal flushed), then handed back.
                        job.preempted = True
                        job.requeue.set()
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnecting: watch again
                log.warning("watching job %s: %s", job.info.job_id, exc)
                await asyncio.sleep(1.0)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]

    def _moved(self, job: RunningJob) -> None:
        job.moved_at = time.monotonic()
        job.moved_stamp = now()

    async def _stall_watch(self, job: RunningJob) -> None:
        """Mark the job stalled once its progress has not moved for `stall_after_s`; with the
        `fail` action, end it then (this task ending is what stops the evaluation)."""
        assert job.stall_after_s is not None
        while True:
            idle = time.monotonic() - job.moved_at
            if idle < job.stall_after_s:
                await asyncio.sleep(job.stall_after_s - idle)
                continue
            await self._report_stall(job, idle)
            if job.stall_action == "fail":
                job.stalled.set()
                return
            # Reported: wait for progress to move, then watch afresh.
            seen = job.moved_at
            while job.moved_at == seen:
                await asyncio.sleep(min(1.0, job.stall_after_s))

    async def _report_stall(self, job: RunningJob, idle: float) -> None:
        since = job.moved_stamp

        def event(applied: Applied) -> lifecycle.Event:
            return lifecycle.stalled_event(
                applied.after, worker=self.worker_id, at=now(), seconds=idle, action=job.stall_action
            )

        log.warning("job %s: no progress for %.0f s (since %s)", job.info.job_id, idle, since)
        try:
            await self.recorder.record(job.info.job_id, lambda info: lifecycle.stall(info, since=since), event)
        except Exception as exc:
            log.warning("job %s: the stall was not recorded: %s", job.info.job_id, exc)

    def _on_progress(self, job: RunningJob, progress: Progress) -> None:
        if not job.announced or job.quiet:
            return
        position = (progress.phase, progress.done)
        if position != job.position:
            job.position = position
            self._moved(job)
        clock = time.monotonic()
        phase_changed = progress.phase != job.last_phase
        if position == job.reported:
            return  # a bar redrawn where it was: nothing to say (and a stall mark stays)
        if not phase_changed and clock - job.last_progress_at < self.settings.worker.progress_interval:
            return
        job.last_progress_at = clock
        job.last_phase = progress.phase
        job.reported = position
        report = asyncio.get_running_loop().create_task(self._report_progress(job, progress))
        job.reports.add(report)
        report.add_done_callback(job.reports.discard)

    async def _report_progress(self, job: RunningJob, value: Progress) -> None:
        index = job.piece
        change: lifecycle.Change
        if index is None:
            change = lambda info: lifecycle.progress(info, value)  # noqa: E731
        else:
            # A piece reports its share of its documents (a bar may count requests, several per
            # document); the job's progress is the sum over its pieces.
            docs = job.info.pieces[index].docs * min(value.done, value.total) // max(value.total, 1)
            change = lambda info: sharding.piece_progress(info, index, docs)  # noqa: E731

        def event(applied: Applied) -> lifecycle.Event:
            shown = value if index is None else (applied.after.progress or value)
            return lifecycle.progress_event(applied.after, shown, worker=self.worker_id, at=now())

        try:
            await self.recorder.record(job.info.job_id, change, event)
        except Exception as exc:
            log.debug("progress not reported: %s", exc)
