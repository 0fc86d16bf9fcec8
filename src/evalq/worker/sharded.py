"""The steps of a sharded job, as a worker runs them: plan, pieces, merge.

1. **Plan.** The worker that takes a job with `shards > 1` from the work stream moves it to
   `running`, counts its tasks' documents (an evaluation process in `plan` mode), splits it
   (`sharding.plan_pieces`), writes the pieces into the job's record, publishes one message
   per piece to the pool's pieces stream, and acks the job's message.
2. **Pieces.** Any worker of the pool takes a piece (workers fetch pieces before jobs),
   runs lmms-eval on it in `record` mode (which also scores its documents), uploads the
   responses and scores and the log under `<job_id>/shards/<index>/`, marks the piece
   completed in the record, and acks. A piece whose worker dies is redelivered alone; a
   completed piece is never run again, since its state is in the record before its message
   is acked. The worker that completes the last piece publishes the merge step.
3. **Merge.** A worker downloads every piece's responses and scores and runs lmms-eval on
   the whole request in `replay` mode: no model runs and no document is scored again;
   lmms-eval aggregates the same per-document scores an unsharded run computes, so the
   results are the unsharded run's. The job completes as any job.

Every state change goes through `lifecycle`, on the job's one record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from .. import jetstream, lifecycle, sharding
from ..config import Settings
from ..lifecycle import Applied, Cancellation, Failure, Outcome, Recorder, Refused, Success
from ..outage import outlast
from ..policy import effective_cache, effective_timeout, load_policy
from ..registry import cannot_run
from ..schemas import TERMINAL, CacheMode, JobInfo, Piece, PieceItem, decode, now
from ..sharding import plan_pieces
from ..topology import Topology
from .argv import lmms_eval_args
from .entry import ENTRY_MODULE, RESPONSES_FILE, shard_flags
from .evaluation import Evaluation, RunningJob
from .journal_stream import part_name
from .launch import Launch
from .registration import Registration
from .results import collect, tail, upload
from .settle import Settler

__all__ = ["ShardedSteps", "piece_args"]

log = logging.getLogger("evalq.worker")

# A piece whose attempt failed goes back to the pieces stream after this delay.
_RETRY_DELAY = 1.0


def piece_args(info: JobInfo, piece: Piece, output: Path, *, include_dir: Path) -> list[str]:
    """lmms-eval's flags for one piece: its tasks, and its document range when it has one."""
    request = info.request
    assert request is not None
    limit = request.limit
    if piece.offset is not None:
        limit = None  # its range follows, as its own --offset and --limit
    elif limit is not None and piece.limit is not None:
        # The documents the plan counted for its tasks: a fraction of the request, applied to
        # this piece's tasks alone, would give other counts than the whole run gives them.
        limit = piece.limit
    whole = msgspec.structs.replace(request, tasks=piece.tasks, limit=limit)
    args = lmms_eval_args(whole, output_path=output, include_path=include_dir)
    if piece.offset is not None and piece.limit is not None:
        args += [f"--offset={piece.offset}", f"--limit={piece.limit}"]
    return args


def _response_names(info: JobInfo) -> list[str]:
    assert info.request is not None
    if info.request.num_gpus > 1:
        return [f"responses.rank{rank}.pkl" for rank in range(info.request.num_gpus)]
    return [RESPONSES_FILE]


class ShardedSteps:
    """A sharded job's steps on one worker.

    `hold` makes a piece or a merge the worker's job in hand (a shutdown then reaches it);
    `registration` is the worker's entry (who it is, what it can run).
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        topology: Topology,
        settings: Settings,
        *,
        registration: Registration,
        recorder: Recorder,
        settler: Settler,
        evaluation: Evaluation,
        hold: Callable[[RunningJob], None],
    ) -> None:
        self.nc = nc
        self.js = js
        self.topology = topology
        self.settings = settings
        self.pool = settings.worker.pool
        self.registration = registration
        self.recorder = recorder
        self.settler = settler
        self.evaluation = evaluation
        self.hold = hold

    @property
    def worker_id(self) -> str:
        return self.registration.info.worker_id

    async def _publish(self, item: PieceItem, what: str) -> None:
        write = sharding.piece_write(self.topology, self.pool, item)
        timeout = self.settings.connection.request_timeout
        await outlast(
            lambda: jetstream.publish(self.nc, write, timeout=timeout), what, self.settings.worker.outage_timeout
        )

    async def _publish_pieces(self, info: JobInfo) -> None:
        """A message per piece still to run (a held piece's is the dispatcher's to publish)."""
        for piece in info.pieces:
            if piece.status == "queued":
                await self._publish(PieceItem(job_id=info.job_id, step="piece", index=piece.index), "publish a piece")

    async def _publish_merge(self, job_id: str) -> None:
        await self._publish(PieceItem(job_id=job_id, step="merge"), "publish the merge step")

    # --- 1. plan ----------------------------------------------------------------------------

    async def plan(self, job: RunningJob) -> None:
        """Split the job in hand into pieces and queue them; the job's own message is then done."""
        info = job.info
        request = info.request
        assert request is not None
        output = self.settler.output_dir(info)
        if isinstance(output, str):
            await self.settler.conclude(job.msg, info.job_id, Failure(error=output))
            return
        plan_file = output / "plan.json"
        log_path = output / "plan.log"

        async def announce() -> None:
            await self.recorder.announce(lifecycle.started_event(info, worker=self.worker_id, at=now()))

        include_dir = self.evaluation.include_dir
        args = shard_flags("plan", plan_file) + lmms_eval_args(request, output_path=output, include_path=include_dir)
        launch = Launch(args=args, cwd=output, log_path=log_path, module=ENTRY_MODULE, per_gpu=False)
        job.quiet = True
        code = await self.evaluation.run(job, launch, announce)
        if job.requeue.is_set() and not job.cancel.is_set():
            reason = f"worker {self.worker_id} is shutting down"
            await self.settler.requeue(job.msg, info.job_id, attempt=job.attempt, reason=reason)
            return
        failure: Outcome | None = None
        if code is None:
            failure = Failure(error=f"the evaluation could not start: {job.launch_error}")
        elif job.cancel.is_set():
            failure = Cancellation(reason="cancelled while its pieces were planned")
        elif job.timed_out.is_set():
            failure = await self.evaluation.timeout_failure(job, info.job_id, log_path, code)
        pieces: list[Piece] = []
        if failure is None:
            try:
                counts = msgspec.json.decode(plan_file.read_bytes(), type=dict[str, int])
                pieces = plan_pieces(counts, request.shards)
            except (OSError, msgspec.DecodeError, ValueError) as exc:
                log_tail = tail(log_path, self.settings.worker.log_tail_lines)
                await upload(self.settler.store, info.job_id, [(log_path, "plan.log")])
                error = f"could not split the job into pieces: {exc}"
                failure = Failure(error=error, exit_code=code, log_tail=log_tail)
        if failure is not None:
            await self.settler.conclude(job.msg, info.job_id, failure)
            return
        hold = await self._held_by_quota(info.team)
        moved = await self.recorder.record(
            info.job_id, lambda record: sharding.plan(record, pieces, hold=hold), patient=True
        )
        if isinstance(moved, Refused):
            record = moved.current
            if record is not None and record.status == "cancelling":
                cancelled = Cancellation(reason="cancelled while its pieces were planned")
                await self.settler.conclude(job.msg, info.job_id, cancelled)
                return
            if record is None or not record.pieces:
                await self.settler.ack(job.msg)
                return
            planned = record
        else:
            planned = moved.after
        docs = sum(p.docs for p in planned.pieces)
        log.info("job %s: %d pieces of %d documents", info.job_id, len(planned.pieces), docs)
        await self.queue_pieces(job.msg, planned)

    async def _held_by_quota(self, team: str) -> bool:
        """Whether `team`'s `max_running_gpus` decides when the pieces run (the dispatcher then
        releases them). A policy that cannot be read holds them: the dispatcher, which reads
        it too, lets them all go when there is no quota."""
        try:
            policy = await load_policy(self.js, self.topology, self.pool)
        except Exception as exc:
            log.warning("cannot read pool %s's policy (%s): its pieces wait for the dispatcher", self.pool, exc)
            return True
        return policy.scheduling.team(team).max_running_gpus is not None

    async def queue_pieces(self, msg: Msg, planned: JobInfo) -> None:
        """Publish the planned job's pieces that still wait, then let the job's message go."""
        await self._publish_pieces(planned)
        if sharding.all_pieces_done(planned):
            await self._publish_merge(planned.job_id)
        await self.settler.ack(msg)

    # --- 2. pieces --------------------------------------------------------------------------

    async def handle_message(self, msg: Msg) -> None:
        """One message of the pieces stream: a piece to run, or a job to merge."""
        try:
            item = decode(msg.data, PieceItem)
        except (msgspec.DecodeError, ValueError) as exc:
            log.error("an unreadable piece message: %s", exc)
            await msg.term()
            return
        found = await self.recorder.jobs.get(item.job_id)
        if found is None:
            await msg.term()
            return
        info = found[0]
        if item.step == "merge":
            await self._merge(msg, info)
            return
        index = item.index
        if info.status in TERMINAL or not 0 <= index < len(info.pieces) or info.request is None:
            await msg.ack()  # its job ended: nothing to run
            return
        piece = info.pieces[index]
        if info.status == "cancelling":
            await self.cancel_piece(info.job_id, index)
            await msg.ack()
            return
        if piece.status == "completed":
            # Done before (its worker died before the ack): never run again; the merge may be owed.
            if sharding.all_pieces_done(info):
                await self._publish_merge(info.job_id)
            await msg.ack()
            return
        if piece.status in ("failed", "cancelled"):
            await msg.ack()
            return
        if piece.attempts >= self.settings.worker.max_attempts:
            await self._fail_piece(msg, info, index, attempt=piece.attempts, error="its worker stopped answering")
            return
        unable = cannot_run(self.registration.info, info.request)
        if unable is not None:
            log.info("job %s piece %d: %s; handing it back", info.job_id, index, unable)
            await msg.nak(delay=_RETRY_DELAY)
            return
        limit_s = None
        cache: CacheMode = info.request.cache or "off"
        with contextlib.suppress(Exception):  # no policy read: the job's own timeout still applies
            policy = await load_policy(self.js, self.topology, self.pool)
            limit_s = effective_timeout(info.request, policy)
            cache = effective_cache(info.request, policy)
        if limit_s is None:
            limit_s = info.request.timeout
        started_at = now()
        worker_id = self.worker_id
        moved = await self.recorder.record(
            info.job_id, lambda record: sharding.piece_start(record, index, worker=worker_id, at=started_at)
        )
        if isinstance(moved, Refused):
            record = moved.current
            if record is not None and record.status == "cancelling":
                await self.cancel_piece(record.job_id, index)
            await msg.ack()
            return
        started = moved.after
        attempt = started.pieces[index].attempts
        job = RunningJob(info=started, msg=msg, attempt=attempt, limit_s=limit_s, piece=index, cache=cache)
        self.hold(job)
        await self.registration.show(info.job_id)
        await self._run_piece(job)

    async def _run_piece(self, job: RunningJob) -> None:
        info = job.info
        index = job.piece
        assert index is not None and info.request is not None
        piece = info.pieces[index]
        job_dir = self.settler.output_dir(info, fresh=False)
        if isinstance(job_dir, str):
            await self._fail_piece(job.msg, info, index, attempt=job.attempt, error=job_dir)
            return
        output = self.settler.fresh_dir(job_dir / "shards" / str(index))
        log_path = output / "eval.log"
        responses = output / RESPONSES_FILE
        begun = time.monotonic()

        async def announce() -> None:
            at = now()
            await self.recorder.announce(lifecycle.shard_started_event(info, index, worker=self.worker_id, at=at))

        journal = await self.evaluation.journal_for(job, output, part_name(index))
        if isinstance(journal, str):
            await self._fail_piece(job.msg, info, index, attempt=job.attempt, error=journal)
            return
        args = (journal.flags() if journal is not None else []) + shard_flags("record", responses)
        args += piece_args(info, piece, output, include_dir=self.evaluation.include_dir)
        identity = journal.model if journal is not None else None
        launch = Launch(args=args, cwd=output, log_path=log_path, module=ENTRY_MODULE, identity=identity)
        code = await self.evaluation.run(job, launch, announce, journal)
        prefix = f"{info.job_id}/shards/{index}"
        await upload(self.settler.store, prefix, [(log_path, "eval.log")])
        if job.cancel.is_set():
            await self.cancel_piece(info.job_id, index)
            await self.settler.ack(job.msg)
            return
        if job.requeue.is_set():
            # Shutting down: back to the queue for another worker; this attempt did not fail.
            error = f"worker {self.worker_id} shut down"
            await self.recorder.record(
                info.job_id, lambda record: sharding.piece_fail(record, index, error=error, final=False, at=now())
            )
            await job.msg.nak()
            return
        failed = None
        if code is None:
            failed = f"the evaluation could not start: {job.launch_error}"
        elif job.timed_out.is_set():
            failed = f"timeout: the piece ran longer than its limit of {job.limit_s} s and was stopped"
        else:
            files = collect(output)
            if files.results is None:
                last = tail(log_path, 1)
                failed = f"lmms-eval exited with code {code} and {files.problem}" + (f": {last}" if last else "")
        if failed is None:
            names = [name for name in _response_names(info) if (output / name).is_file()]
            if not names:
                failed = "the piece recorded no responses"
            else:
                await upload(self.settler.store, prefix, [(output / name, name) for name in names])
        if failed is not None:
            await self._fail_piece(job.msg, info, index, attempt=job.attempt, error=failed)
            return
        work = None
        if journal is not None:
            try:
                await journal.completed()
            except Exception as exc:  # the piece stands; a later attempt would compute it again
                log.warning("job %s piece %d: journal not settled: %s", info.job_id, index, exc)
            work = journal.work()
        seconds = round(time.monotonic() - begun, 3)
        at = now()

        def event(applied: Applied) -> lifecycle.Event:
            return lifecycle.shard_completed_event(applied.after, index, worker=self.worker_id, at=at)

        moved = await self.recorder.record(
            info.job_id,
            lambda record: sharding.piece_finish(record, index, at=at, seconds=seconds, work=work),
            event,
            patient=True,
        )
        record = moved.after if isinstance(moved, Applied) else moved.current
        if record is not None and sharding.all_pieces_done(record):
            await self._publish_merge(info.job_id)
        elif record is not None and record.status == "cancelling":
            await self.recorder.end_cancelled_if_idle(info.job_id, at=now())
        await self.settler.ack(job.msg)

    async def _fail_piece(self, msg: Msg, info: JobInfo, index: int, *, attempt: int, error: str) -> None:
        """An attempt of a piece failed: it goes back to the queue alone, or, after max_attempts,
        fails the job (whose other pieces then stop)."""
        max_attempts = self.settings.worker.max_attempts
        final = attempt >= max_attempts
        at = now()

        def event(applied: Applied) -> lifecycle.Event:
            return lifecycle.shard_failed_event(
                applied.after, index, attempt=attempt, worker=self.worker_id, error=error, at=at
            )

        await self.recorder.record(
            info.job_id,
            lambda record: sharding.piece_fail(record, index, error=error, final=final, at=at),
            event,
            patient=True,
        )
        if not final:
            log.warning("job %s piece %d attempt %d failed: %s; queued again", info.job_id, index, attempt, error)
            await msg.nak(delay=_RETRY_DELAY)
            return
        reason = f"piece {index} failed {attempt} times (max_attempts={max_attempts}): {error}"
        # Its running pieces stop (their workers watch the record); those still queued are
        # dropped unrun by whichever worker takes them.
        await self.recorder.finish(info.job_id, Failure(error=reason), at=at, worker=self.worker_id)
        await self._remove_journals(info)
        await self.settler.ack(msg)

    async def cancel_piece(self, job_id: str, index: int) -> None:
        await self.recorder.record(job_id, lambda record: sharding.piece_cancel(record, index, at=now()), patient=True)
        await self.recorder.end_cancelled_if_idle(job_id, at=now())

    # --- 3. merge ---------------------------------------------------------------------------

    async def _merge(self, msg: Msg, info: JobInfo) -> None:
        if info.status in TERMINAL:
            await msg.ack()
            return
        if info.status == "cancelling":
            cancelled = Cancellation(reason="cancelled before its pieces were merged")
            await self.settler.conclude(msg, info.job_id, cancelled)
            return
        if not sharding.all_pieces_done(info) or info.request is None:
            await msg.ack()  # not this job's last step after all; its last piece publishes it again
            return
        job = RunningJob(info=info, msg=msg, attempt=info.attempts, quiet=True)
        self.hold(job)
        output = self.settler.output_dir(info)
        if isinstance(output, str):
            await self.settler.conclude(msg, info.job_id, Failure(error=output))
            return
        responses = output / "responses"

        async def download(index: int, name: str) -> None:
            folder = responses / str(index)
            folder.mkdir(parents=True, exist_ok=True)
            data = await self.settler.fetch(f"{info.job_id}/shards/{index}/{name}", "download a piece's responses")
            (folder / name).write_bytes(data)

        try:
            names = _response_names(info)
            await asyncio.gather(*(download(piece.index, name) for piece in info.pieces for name in names))
        except Exception as exc:
            if (msg.metadata.num_delivered or 1) >= self.settings.worker.max_attempts:
                unread = Failure(error=f"a piece's responses could not be read: {exc}")
                await self.settler.conclude(msg, info.job_id, unread)
            else:
                log.warning("job %s: could not download the pieces' responses (%s); retrying", info.job_id, exc)
                await msg.nak(delay=_RETRY_DELAY)
            return
        log_path = output / "eval.log"
        begun = time.monotonic()
        launched_at = time.time()

        async def announce() -> None:
            return None

        include_dir = self.evaluation.include_dir
        args = shard_flags("replay", responses) + lmms_eval_args(
            info.request, output_path=output, include_path=include_dir
        )
        launch = Launch(args=args, cwd=output, log_path=log_path, module=ENTRY_MODULE, per_gpu=False)
        code = await self.evaluation.run(job, launch, announce)
        outcome = await self.evaluation.outcome(
            job, code, output, log_path, duration_s=_since(info.started_at, begun), started_at=launched_at, step="merge"
        )
        if outcome is None:
            await msg.nak()  # shutting down: another worker merges
            return
        if isinstance(outcome, Success):
            logs = [f"{info.job_id}/shards/{piece.index}/eval.log" for piece in info.pieces]
            artifacts = [*outcome.result.artifacts, *logs]
            result = msgspec.structs.replace(outcome.result, artifacts=artifacts, work=sharding.pieces_work(info))
            outcome = Success(result=result)
        else:
            await self._remove_journals(info)
        await self.settler.conclude(msg, info.job_id, outcome)

    async def _remove_journals(self, info: JobInfo) -> None:
        """A sharded job that ends without results keeps no journal (a completed one's are kept
        for re-scoring, as a whole job's)."""
        try:
            await self.evaluation.journal.remove(info.job_id, [part_name(piece.index) for piece in info.pieces])
        except Exception as exc:  # they expire with the journal stream's max age
            log.warning("job %s: journals not removed: %s", info.job_id, exc)


def _since(started_at: str | None, fallback: float) -> float:
    """Seconds since the job started (all its pieces), or since `fallback` (a monotonic time)."""
    if started_at:
        with contextlib.suppress(ValueError):
            begun = dt.datetime.fromisoformat(started_at.replace("Z", "+00:00"))
            return round((dt.datetime.now(dt.UTC) - begun).total_seconds(), 3)
    return round(time.monotonic() - fallback, 3)
