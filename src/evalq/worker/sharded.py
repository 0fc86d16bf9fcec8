"""The steps of a sharded job, as a worker runs them: plan, pieces, merge.

1. **Plan.** The worker that takes a job with `shards > 1` from the work stream moves it to
   `running`, counts its tasks' documents (an evaluation process in `plan` mode), splits it
   (`sharding.plan_pieces`), writes the pieces into the job's record, publishes one message
   per piece to the pool's pieces stream, and acks the job's message.
2. **Pieces.** Any worker of the pool takes a piece (workers fetch pieces before jobs),
   runs lmms-eval on it in `record` mode, uploads the responses and the log under
   `<job_id>/shards/<index>/`, marks the piece completed in the record, and acks. A piece
   whose worker dies is redelivered alone; a completed piece is never run again, since its
   state is in the record before its message is acked. The worker that completes the last
   piece publishes the merge step.
3. **Merge.** A worker downloads every piece's responses and runs lmms-eval on the whole
   request in `replay` mode: lmms-eval computes every metric from the same responses an
   unsharded run gets, so the results are the unsharded run's. The job completes as any job.

Every state change goes through `lifecycle`, on the job's one record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from .. import jetstream, lifecycle, sharding
from ..capability import cannot_run
from ..lifecycle import Applied, Cancellation, Failure, Outcome, Refused, Success
from ..outage import outlast
from ..policy import effective_timeout, load_policy
from ..schemas import TERMINAL, JobInfo, Piece, PieceItem, decode, encode, now
from ..sharding import plan_pieces
from .argv import lmms_eval_args
from .results import collect, outcome_of, tail, upload
from .sharded_eval import RESPONSES_FILE, shard_flags

if TYPE_CHECKING:
    from .service import Worker, _Current

__all__ = [
    "SHARDED_MODULE",
    "cancel_piece",
    "handle_piece_message",
    "piece_args",
    "plan_job",
    "queue_pieces",
]

log = logging.getLogger("evalq.worker")

SHARDED_MODULE = "evalq.worker.sharded_eval"
# A piece whose attempt failed goes back to the pieces stream after this delay.
_RETRY_DELAY = 1.0


def piece_args(worker: Worker, info: JobInfo, piece: Piece, output: Path) -> list[str]:
    """lmms-eval's flags for one piece: its tasks, and its document range when it has one."""
    request = info.request
    assert request is not None
    whole = msgspec.structs.replace(request, tasks=piece.tasks)
    if piece.offset is not None:
        whole = msgspec.structs.replace(whole, limit=None)
    args = lmms_eval_args(whole, output_path=output, include_path=worker.include_dir)
    if piece.offset is not None and piece.limit is not None:
        args += [f"--offset={piece.offset}", f"--limit={piece.limit}"]
    return args


def _response_names(info: JobInfo, index: int) -> list[str]:
    assert info.request is not None
    if info.request.num_gpus > 1:
        return [f"responses.rank{rank}.pkl" for rank in range(info.request.num_gpus)]
    return [RESPONSES_FILE]


async def _publish_pieces(worker: Worker, info: JobInfo) -> None:
    """A message per piece still to run; ids make a re-publication (a redelivered plan) a no-op."""
    for piece in info.pieces:
        if piece.status != "queued":
            continue
        body = encode(PieceItem(job_id=info.job_id, step="piece", index=piece.index))
        write = jetstream.Write(
            worker.topology.piece_subject(worker.pool, info.job_id, str(piece.index)),
            body,
            {"Nats-Msg-Id": f"{info.job_id}.piece.{piece.index}"},
            stream=worker.topology.pieces_stream(worker.pool),
        )
        publish = functools.partial(
            jetstream.publish, worker.nc, write, timeout=worker.settings.connection.request_timeout
        )
        await outlast(publish, "publish a piece", worker.settings.worker.outage_timeout)


async def _publish_merge(worker: Worker, job_id: str) -> None:
    body = encode(PieceItem(job_id=job_id, step="merge"))
    write = jetstream.Write(
        worker.topology.piece_subject(worker.pool, job_id, "merge"),
        body,
        {"Nats-Msg-Id": f"{job_id}.merge"},
        stream=worker.topology.pieces_stream(worker.pool),
    )
    await outlast(
        lambda: jetstream.publish(worker.nc, write, timeout=worker.settings.connection.request_timeout),
        "publish the merge step",
        worker.settings.worker.outage_timeout,
    )


# --- 1. plan --------------------------------------------------------------------------------


async def plan_job(worker: Worker, current: _Current) -> None:
    """Split the job in hand into pieces and queue them; the job's own message is then done."""
    info = current.info
    request = info.request
    assert request is not None
    output = worker._output_dir(info)
    if isinstance(output, str):
        await worker._conclude(current.msg, info.job_id, Failure(error=output))
        return
    plan_file = output / "plan.json"
    log_path = output / "plan.log"

    async def announce() -> None:
        await worker.recorder.announce(lifecycle.started_event(info, worker=worker.worker_id, at=now()))

    args = shard_flags("plan", plan_file) + lmms_eval_args(request, output_path=output, include_path=worker.include_dir)
    from .service import Launch

    launch = Launch(args=args, cwd=output, log_path=log_path, module=SHARDED_MODULE, per_gpu=False)
    current.quiet = True
    code = await worker._evaluate(current, launch, announce)
    if current.requeue.is_set() and not current.cancel.is_set():
        await worker._requeue(current, f"worker {worker.worker_id} is shutting down")
        return
    failure: Outcome | None = None
    if code is None:
        failure = Failure(error=f"the evaluation could not start: {current.launch_error}")
    elif current.cancel.is_set():
        failure = Cancellation(reason="cancelled while its pieces were planned")
    elif current.timed_out.is_set():
        failure = await worker._timeout_failure(current, info.job_id, log_path, code)
    pieces: list[Piece] = []
    if failure is None:
        try:
            counts = msgspec.json.decode(plan_file.read_bytes(), type=dict[str, int])
            pieces = plan_pieces(counts, request.shards)
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            log_tail = tail(log_path, worker.settings.worker.log_tail_lines)
            await upload(worker._store_artifact, info.job_id, [(log_path, "plan.log")])
            failure = Failure(error=f"could not split the job into pieces: {exc}", exit_code=code, log_tail=log_tail)
    if failure is not None:
        await worker._conclude(current.msg, info.job_id, failure)
        return
    moved = await worker.recorder.record(info.job_id, lambda record: sharding.plan(record, pieces), patient=True)
    if isinstance(moved, Refused):
        record = moved.current
        if record is not None and record.status == "cancelling":
            await worker._conclude(
                current.msg, info.job_id, Cancellation(reason="cancelled while its pieces were planned")
            )
            return
        if record is None or not record.pieces:
            await outlast(current.msg.ack, "ack", worker.settings.worker.outage_timeout)
            return
        planned = record
    else:
        planned = moved.after
    log.info("job %s: %d pieces of %d documents", info.job_id, len(planned.pieces), sum(p.docs for p in planned.pieces))
    await queue_pieces(worker, current.msg, planned)


async def queue_pieces(worker: Worker, msg: Msg, planned: JobInfo) -> None:
    """Publish the planned job's pieces that still wait, then let the job's message go."""
    await _publish_pieces(worker, planned)
    if sharding.all_pieces_done(planned):
        await _publish_merge(worker, planned.job_id)
    await outlast(msg.ack, "ack", worker.settings.worker.outage_timeout)


# --- 2. pieces ------------------------------------------------------------------------------


async def handle_piece_message(worker: Worker, msg: Msg) -> None:
    """One message of the pieces stream: a piece to run, or a job to merge."""
    try:
        item = decode(msg.data, PieceItem)
    except (msgspec.DecodeError, ValueError) as exc:
        log.error("an unreadable piece message: %s", exc)
        await msg.term()
        return
    found = await worker.jobs.get(item.job_id)
    if found is None:
        await msg.term()
        return
    info = found[0]
    if item.step == "merge":
        await _merge(worker, msg, info)
        return
    index = item.index
    if info.status in TERMINAL or not 0 <= index < len(info.pieces) or info.request is None:
        await msg.ack()  # its job ended: nothing to run
        return
    piece = info.pieces[index]
    if info.status == "cancelling":
        await cancel_piece(worker, info.job_id, index)
        await msg.ack()
        return
    if piece.status == "completed":
        # Done before (its worker died before the ack): never run again; the merge may be owed.
        if sharding.all_pieces_done(info):
            await _publish_merge(worker, info.job_id)
        await msg.ack()
        return
    if piece.status in ("failed", "cancelled"):
        await msg.ack()
        return
    max_attempts = worker.settings.worker.max_attempts
    if piece.attempts >= max_attempts:
        await _fail_piece(worker, msg, info, index, attempt=piece.attempts, error="its worker stopped answering")
        return
    unable = cannot_run(worker.registration.info, info.request)
    if unable is not None:
        log.info("job %s piece %d: %s; handing it back", info.job_id, index, unable)
        await msg.nak(delay=_RETRY_DELAY)
        return
    limit_s = None
    with contextlib.suppress(Exception):  # no policy read: the job's own timeout still applies
        limit_s = effective_timeout(info.request, await load_policy(worker.js, worker.topology, worker.pool))
    if limit_s is None:
        limit_s = info.request.timeout
    started_at = now()
    moved = await worker.recorder.record(
        info.job_id, lambda record: sharding.piece_start(record, index, worker=worker.worker_id, at=started_at)
    )
    if isinstance(moved, Refused):
        record = moved.current
        if record is not None and record.status == "cancelling":
            await cancel_piece(worker, record.job_id, index)
        await msg.ack()
        return
    from .service import _Current

    started = moved.after
    attempt = started.pieces[index].attempts
    current = _Current(info=started, msg=msg, attempt=attempt, limit_s=limit_s, piece=index)
    worker.current = current
    if worker.stopping:
        worker._stop_job(current)
    if worker.registration.wanted:
        with contextlib.suppress(Exception):
            await worker.registration.put(current_job=info.job_id)
    await _run_piece(worker, current)


async def _run_piece(worker: Worker, current: _Current) -> None:
    from .service import Launch

    info = current.info
    index = current.piece
    assert index is not None and info.request is not None
    piece = info.pieces[index]
    job_dir = worker._output_dir(info, fresh=False)
    if isinstance(job_dir, str):
        await _fail_piece(worker, current.msg, info, index, attempt=current.attempt, error=job_dir)
        return
    output = worker._fresh_dir(job_dir / "shards" / str(index))
    log_path = output / "eval.log"
    responses = output / RESPONSES_FILE
    begun = time.monotonic()

    async def announce() -> None:
        at = now()
        await worker.recorder.announce(lifecycle.shard_started_event(info, index, worker=worker.worker_id, at=at))

    args = shard_flags("record", responses) + piece_args(worker, info, piece, output)
    code = await worker._evaluate(
        current, Launch(args=args, cwd=output, log_path=log_path, module=SHARDED_MODULE), announce
    )
    prefix = f"{info.job_id}/shards/{index}"
    await upload(worker._store_artifact, prefix, [(log_path, "eval.log")])
    if current.cancel.is_set():
        await cancel_piece(worker, info.job_id, index)
        await outlast(current.msg.ack, "ack", worker.settings.worker.outage_timeout)
        return
    if current.requeue.is_set():
        # Shutting down: back to the queue for another worker; this attempt did not fail.
        await worker.recorder.record(
            info.job_id,
            lambda record: sharding.piece_fail(
                record, index, error=f"worker {worker.worker_id} shut down", final=False, at=now()
            ),
        )
        await current.msg.nak()
        return
    error = None
    if code is None:
        error = f"the evaluation could not start: {current.launch_error}"
    elif current.timed_out.is_set():
        error = f"timeout: the piece ran longer than its limit of {current.limit_s} s and was stopped"
    else:
        files = collect(output)
        if files.results is None:
            last = tail(log_path, 1)
            error = f"lmms-eval exited with code {code} and {files.problem}" + (f": {last}" if last else "")
    if error is None:
        names = [name for name in _response_names(info, index) if (output / name).is_file()]
        if not names:
            error = "the piece recorded no responses"
        else:
            await upload(worker._store_artifact, prefix, [(output / name, name) for name in names])
    if error is not None:
        await _fail_piece(worker, current.msg, info, index, attempt=current.attempt, error=error)
        return
    seconds = round(time.monotonic() - begun, 3)
    at = now()

    def event(applied: Applied) -> lifecycle.Event:
        return lifecycle.shard_completed_event(applied.after, index, worker=worker.worker_id, at=at)

    moved = await worker.recorder.record(
        info.job_id, lambda record: sharding.piece_finish(record, index, at=at, seconds=seconds), event, patient=True
    )
    record = moved.after if isinstance(moved, Applied) else moved.current
    if record is not None and sharding.all_pieces_done(record):
        await _publish_merge(worker, info.job_id)
    elif record is not None and record.status == "cancelling":
        await worker.recorder.end_cancelled_if_idle(info.job_id, at=now())
    await outlast(current.msg.ack, "ack", worker.settings.worker.outage_timeout)


async def _fail_piece(worker: Worker, msg: Msg, info: JobInfo, index: int, *, attempt: int, error: str) -> None:
    """An attempt of a piece failed: it goes back to the queue alone, or, after max_attempts,
    fails the job (whose other pieces then stop)."""
    final = attempt >= worker.settings.worker.max_attempts
    at = now()

    def event(applied: Applied) -> lifecycle.Event:
        return lifecycle.shard_failed_event(
            applied.after, index, attempt=attempt, worker=worker.worker_id, error=error, at=at
        )

    await worker.recorder.record(
        info.job_id,
        lambda record: sharding.piece_fail(record, index, error=error, final=final, at=at),
        event,
        patient=True,
    )
    if not final:
        log.warning("job %s piece %d attempt %d failed: %s; queued again", info.job_id, index, attempt, error)
        await msg.nak(delay=_RETRY_DELAY)
        return
    reason = f"piece {index} failed {attempt} times (max_attempts={worker.settings.worker.max_attempts}): {error}"
    # Its running pieces stop (their workers watch the record); those still queued are
    # dropped unrun by whichever worker takes them.
    await worker.recorder.finish(info.job_id, Failure(error=reason), at=at, worker=worker.worker_id)
    await outlast(msg.ack, "ack", worker.settings.worker.outage_timeout)


async def cancel_piece(worker: Worker, job_id: str, index: int) -> None:
    await worker.recorder.record(job_id, lambda record: sharding.piece_cancel(record, index, at=now()), patient=True)
    await worker.recorder.end_cancelled_if_idle(job_id, at=now())


# --- 3. merge -------------------------------------------------------------------------------


async def _merge(worker: Worker, msg: Msg, info: JobInfo) -> None:
    from .service import Launch, _Current

    if info.status in TERMINAL:
        await msg.ack()
        return
    if info.status == "cancelling":
        await worker._conclude(msg, info.job_id, Cancellation(reason="cancelled before its pieces were merged"))
        return
    if not sharding.all_pieces_done(info) or info.request is None:
        await msg.ack()  # not this job's last step after all; its last piece publishes it again
        return
    current = _Current(info=info, msg=msg, attempt=info.attempts, quiet=True)
    worker.current = current
    if worker.stopping:
        worker._stop_job(current)
    output = worker._output_dir(info)
    if isinstance(output, str):
        await worker._conclude(msg, info.job_id, Failure(error=output))
        return
    responses = output / "responses"

    async def download(index: int, name: str) -> None:
        folder = responses / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        get = functools.partial(worker.results.get, f"{info.job_id}/shards/{index}/{name}")
        got = await outlast(get, "download a piece's responses", worker.settings.worker.outage_timeout)
        (folder / name).write_bytes(got.data or b"")

    try:
        await asyncio.gather(
            *(download(piece.index, name) for piece in info.pieces for name in _response_names(info, piece.index))
        )
    except Exception as exc:
        if (msg.metadata.num_delivered or 1) >= worker.settings.worker.max_attempts:
            await worker._conclude(msg, info.job_id, Failure(error=f"a piece's responses could not be read: {exc}"))
        else:
            log.warning("job %s: could not download the pieces' responses (%s); retrying", info.job_id, exc)
            await msg.nak(delay=_RETRY_DELAY)
        return
    log_path = output / "eval.log"
    begun = time.monotonic()
    launched_at = time.time()

    async def announce() -> None:
        return None

    args = shard_flags("replay", responses) + lmms_eval_args(
        info.request, output_path=output, include_path=worker.include_dir
    )
    launch = Launch(args=args, cwd=output, log_path=log_path, module=SHARDED_MODULE, per_gpu=False)
    code = await worker._evaluate(current, launch, announce)
    outcome: Outcome
    if code is None:
        outcome = Failure(error=f"the merge could not start: {current.launch_error}")
    elif current.cancel.is_set():
        outcome = worker._cancellation(current)
    elif current.timed_out.is_set():
        outcome = await worker._timeout_failure(current, info.job_id, log_path, code)
    elif current.requeue.is_set():
        await msg.nak()  # shutting down: another worker merges
        return
    else:
        outcome = await outcome_of(
            output,
            log_path,
            code,
            job_id=info.job_id,
            put=worker._store_artifact,
            duration_s=_since(info.started_at, begun),
            tail_lines=worker.settings.worker.log_tail_lines,
            started_at=launched_at,
        )
        if isinstance(outcome, Success):
            logs = [f"{info.job_id}/shards/{piece.index}/eval.log" for piece in info.pieces]
            result = msgspec.structs.replace(outcome.result, artifacts=[*outcome.result.artifacts, *logs])
            outcome = Success(result=result)
    await worker._conclude(msg, info.job_id, outcome)


def _since(started_at: str | None, fallback: float) -> float:
    """Seconds since the job started (all its pieces), or since `fallback` (a monotonic time)."""
    import datetime as dt

    if started_at:
        with contextlib.suppress(ValueError):
            begun = dt.datetime.fromisoformat(started_at.replace("Z", "+00:00"))
            return round((dt.datetime.now(dt.UTC) - begun).total_seconds(), 3)
    return round(time.monotonic() - fallback, 3)
