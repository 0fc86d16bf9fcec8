"""The worker: the pull loop of one durable consumer, and the evaluation process it supervises.

Per job: take the message, move the record to `running` (`lifecycle.start`), start the
evaluation (forked from the warm evaluator, or a fresh process), and supervise it until it
ends: keep the message alive (`in_progress`), watch the record for a cancel, and report
progress. What it produced becomes an `Outcome` (`results.outcome_of`); the lifecycle
records it and publishes its event, and only then is the message acked. Every change of
a job's record goes through `lifecycle.Recorder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from .. import __version__, lifecycle, sharding
from ..capability import cannot_run
from ..config import Settings
from ..events import EventPublisher
from ..jobstore import JobStore
from ..lifecycle import Applied, Cancellation, Failure, Outcome, Recorder, Refused
from ..outage import outlast
from ..policy import effective_timeout, load_policy, missing_model, recheck
from ..schemas import (
    JOB_ID_SEGMENT,
    TERMINAL,
    EvaluateRequest,
    JobInfo,
    Progress,
    WorkerInfo,
    WorkItem,
    decode,
    now,
)
from ..topology import Topology
from . import sharded
from .argv import evaluator_command, lmms_eval_args, scrubbed_env
from .inventory import take_inventory
from .registration import Registration
from .resident import Resident, ResidentJob, resident_key
from .results import outcome_of, tail, upload
from .runner import EvalProcess
from .taskpaths import build_include_dir
from .warm import WarmEvaluator, WarmProcess, ZygoteError

__all__ = ["Worker"]

log = logging.getLogger("evalq.worker")

# A zygote that fails to start this many times in a row is given up on.
_ZYGOTE_STARTS = 3
# A job this worker cannot run goes back to the queue after this delay, doubling with each
# delivery up to ack_wait, so that a worker that can run it takes it when it is free.
_HAND_BACK_DELAY = 1.0
# Deliveries whose handling raised before the job's outcome was known, after which it fails.
_BROKEN = 10


@dataclass(frozen=True)
class Launch:
    """One evaluation process: `python -m <module> <args>` (or the configured evaluator) in `cwd`."""

    args: list[str]
    cwd: Path
    log_path: Path
    module: str = "lmms_eval"
    # Runs once per GPU under accelerate when the job asks for several (a plan or a merge
    # loads no model and runs as one process).
    per_gpu: bool = True


@dataclass
class _Current:
    """The job in hand, and why it may have to stop early."""

    info: JobInfo
    msg: Msg
    attempt: int
    process: EvalProcess | WarmProcess | ResidentJob | None = None
    # Seconds the evaluation may run (the job's timeout, or its pool's); None: no limit.
    limit_s: int | None = None
    timed_out: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested_at: float | None = None
    launch_error: str = ""
    # The piece of a sharded job this evaluation runs (None: the whole job, or its plan or merge).
    piece: int | None = None
    # A sharded job's plan and merge steps report no progress: the job's progress counts
    # the documents its pieces answered.
    quiet: bool = False
    # What the resident model said for this job: (reused, load seconds); None: no resident.
    model: tuple[bool, float | None] | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    requeue: asyncio.Event = field(default_factory=asyncio.Event)
    last_progress_at: float = 0.0
    last_phase: str = ""
    # Progress is reported only between `started` and the outcome, so that no progress event
    # precedes the one or follows the other.
    announced: bool = False
    reports: set[asyncio.Task[None]] = field(default_factory=set)


class Worker:
    """`async with Worker(nc, settings) as worker: await worker.run()`.

    `request_stop()` (or SIGTERM/SIGINT when `handle_signals`) stops fetching; the job in
    hand then finishes within `grace` (shutdown_mode "finish") or is ended and handed back
    at once with `nak()` (shutdown_mode "requeue").
    """

    def __init__(self, nc: Client, settings: Settings, topology: Topology | None = None) -> None:
        self.nc = nc
        self.settings = settings
        self.topology = topology or Topology.from_settings(settings)
        domain = settings.connection.js_domain
        self.js = nc.jetstream(timeout=settings.connection.request_timeout, domain=domain)
        self.pool = settings.worker.pool
        host = socket.gethostname()
        self.worker_id = settings.worker.worker_id or re.sub(
            r"[^A-Za-z0-9_\-]", "-", f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.events = EventPublisher(nc, self.topology, timeout=settings.connection.request_timeout, domain=domain)
        self.results_root = settings.results_root
        self.state_dir = settings.home_path / "worker" / self.worker_id
        self.registration = Registration(
            nc,
            self.topology.workers_bucket,
            WorkerInfo(
                worker_id=self.worker_id,
                host=host,
                pid=os.getpid(),
                pool=self.pool,
                version=__version__,
                started_at=now(),
            ),
            heartbeat=settings.worker.heartbeat,
            timeout=settings.connection.request_timeout,
        )
        # The consumer's ack_wait as the server has it: the keep-alive follows it, whatever
        # this worker's own setting says.
        self.ack_wait = settings.queue.ack_wait
        self.current: _Current | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._signals: list[int] = []
        self.warm: WarmEvaluator | None = None
        self.resident: Resident | None = None

    @property
    def info(self) -> WorkerInfo:
        return self.registration.info

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> Worker:
        await self.topology.ensure(self.js, pools=(self.pool,))
        self.ack_wait = await self.topology.ack_wait_of(self.js, self.pool)
        if self.ack_wait != self.settings.queue.ack_wait:
            log.warning(
                "pool %s: the consumer's ack_wait is %.0f s, this worker's setting %.0f s; keeping jobs alive "
                "for the consumer's (`evalq setup` changes it)",
                self.pool,
                self.ack_wait,
                self.settings.queue.ack_wait,
            )
        self.jobs = JobStore(await self.js.key_value(self.topology.jobs_bucket))
        self.recorder = Recorder(
            self.jobs,
            self.events,
            patience=self.settings.worker.outage_timeout,
        )
        self.results = await self.js.object_store(self.topology.results_bucket)
        self.sub = await self.js.pull_subscribe_bind(self.topology.consumer, self.topology.work_stream(self.pool))
        self.pieces = await self.js.pull_subscribe_bind(self.topology.consumer, self.topology.pieces_stream(self.pool))
        self.results_root.mkdir(parents=True, exist_ok=True)
        self.include_dir = build_include_dir(self.state_dir / "tasks", self.settings.worker.task_paths)
        if self.settings.worker.warm_evaluator and not self.settings.worker.evaluator and sys.platform == "linux":
            self.warm = WarmEvaluator(
                self.include_dir, env=scrubbed_env(os.environ), log_path=self.state_dir / "zygote.log"
            )
            self.warm.start()  # warms up while the worker waits for its first job
        if self.settings.worker.advertise_inventory:
            # Listed only with its inventory: see registration.py.
            self._tasks.append(asyncio.create_task(self._advertise(), name="inventory"))
        else:
            await self.registration.put(current_job=None)
        self._tasks.append(asyncio.create_task(self.registration.beat(self._current_job_id), name="heartbeat"))
        if self.settings.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                self._signals.append(sig)
        log.info("worker %s serving pool %s", self.worker_id, self.pool)
        return self

    async def stop(self) -> None:
        self.request_stop()
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # nats-py can swallow a cancellation inside a request; the loops also watch
            # a flag, and the wait is bounded either way.
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.registration.remove()
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.pieces.unsubscribe()
        if self.resident is not None:
            with contextlib.suppress(Exception):
                await self.resident.close()
            self.resident = None
        if self.warm is not None:
            await self.warm.close()

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def request_stop(self) -> None:
        """Stop taking jobs; see the class docstring for the job in hand."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.current is not None:
            self._stop_job(self.current)

    def _stop_job(self, current: _Current) -> None:
        if self.settings.worker.shutdown_mode == "requeue":
            current.requeue.set()
        else:
            asyncio.get_running_loop().call_later(self.settings.worker.grace, current.requeue.set)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _current_job_id(self) -> str | None:
        return self.current.info.job_id if self.current else None

    async def _advertise(self) -> None:
        env = scrubbed_env(os.environ)
        found = await take_inventory(self.include_dir, env, self.warm)
        if found is None:
            return  # take_inventory said why; the worker still runs jobs, unlisted
        await self.registration.advertise(
            dict(
                lmms_eval_version=found.lmms_eval_version,
                gpus=found.gpus,
                gpu_count=len(found.gpus),
                models=found.models,
                tasks=found.tasks,
            ),
            current_job=self._current_job_id(),
        )
        log.info("advertising %d models and %d tasks", len(found.models), len(found.tasks))

    # --- the pull loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Take jobs one at a time until stopped."""
        while not self.stopping:
            await self.release_idle_model()
            try:
                msgs, is_piece = await self._fetch()
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # e.g. disconnected: wait for the reconnect
                log.warning("fetch failed: %s", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 1.0)
                continue
            for msg in msgs:
                if self.stopping:
                    with contextlib.suppress(Exception):
                        await msg.nak()  # taken while stopping: hand it straight back
                    continue
                try:
                    await self._take(msg, piece=is_piece)
                except Exception as exc:
                    log.exception("job handling failed; the message will be redelivered")
                    await self._after_error(msg, exc)
                finally:
                    self.current = None
                    if self.registration.wanted:
                        with contextlib.suppress(Exception):
                            await self.registration.put(current_job=None)  # no longer advertise the job

    async def _fetch(self) -> tuple[list[Msg], bool]:
        """The next message: a piece of a started sharded job first, else a new job."""
        with contextlib.suppress(TimeoutError, NatsTimeout):
            return await self.pieces.fetch(1, timeout=0.1), True
        # Short, so that pieces queued meanwhile wait at most this long for an idle worker.
        return await self.sub.fetch(1, timeout=0.5), False

    async def _after_error(self, msg: Msg, exc: Exception) -> None:
        """A message whose handling keeps failing before its outcome is known (not an outage:
        its cause is in the message or the record) fails its job after `_BROKEN` deliveries,
        rather than coming back every ack_wait for ever."""
        deliveries = msg.metadata.num_delivered or 1
        if deliveries < _BROKEN:
            return
        job_id = None
        with contextlib.suppress(Exception):
            job_id = decode(msg.data, WorkItem).job_id
        if job_id is None:
            with contextlib.suppress(Exception):
                await msg.term()
            return
        reason = f"handling the job failed {deliveries} times; the last error: {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            await self._conclude(msg, job_id, Failure(error=reason))

    async def _hand_on(self, msg: Msg, info: JobInfo, unable: str, *, deliveries: int) -> None:
        """A job this worker cannot run: back to the queue while a live worker of the pool can
        run it (it may be busy: the delay grows to ack_wait), failed with the reason when none can."""
        assert info.request is not None
        able = [peer.worker_id for peer in await self._peers() if cannot_run(peer, info.request) is None]
        if able:
            # Jittered: the server hands a returning message to the oldest waiting fetch, and
            # this worker's fetches keep time with its own hand-back; without jitter the same
            # worker can take it back every time.
            delay = min(self.ack_wait, _HAND_BACK_DELAY * 2 ** min(deliveries - 1, 10)) + random.uniform(0, 2.0)
            log.info("job %s: %s; handing it back for %s (in %.0f s)", info.job_id, unable, ", ".join(able), delay)
            await msg.nak(delay=delay)
            return
        why = f"no live worker of pool {self.pool!r} can run it: {self.worker_id} took it, but {unable}"
        await self._conclude(msg, info.job_id, Failure(error=why))

    async def _peers(self) -> list[WorkerInfo]:
        """The other live workers of this pool, as the workers bucket lists them."""
        peers: list[WorkerInfo] = []
        try:
            kv = await self.js.key_value(self.topology.workers_bucket)
            keys = await kv.keys()
        except Exception:  # no keys, or NATS away: nobody known to hand it to
            return peers
        for key in keys:
            if key == self.worker_id:
                continue
            with contextlib.suppress(Exception):
                entry = await kv.get(key)
                if entry.value:
                    peer = decode(entry.value, WorkerInfo)
                    if peer.pool == self.pool:
                        peers.append(peer)
        return peers

    async def _refuse_unreadable(self, msg: Msg, exc: Exception) -> None:
        """A message this worker cannot read (written before a rule it now enforces, or by
        hand): its job, if it has a record, fails with the reason; the message is dropped."""
        log.error("an unreadable work message (seq %s): %s", msg.metadata.sequence.stream, exc)
        try:
            job_id = msgspec.json.decode(msg.data, type=dict[str, Any]).get("job_id")
        except (msgspec.DecodeError, ValueError):
            job_id = None
        found = None
        if isinstance(job_id, str):
            with contextlib.suppress(Exception):  # not even a valid key: nothing to fail
                found = await self.jobs.get(job_id)
        if found is not None:
            await self._conclude(msg, found[0].job_id, Failure(error=f"the job's request is not valid here: {exc}"))
            return
        await msg.term()

    async def _record_of(self, item: WorkItem, seq: int) -> JobInfo:
        """The job's record; created from the message if the gateway never wrote it."""
        deadline = time.monotonic() + 5.0
        while True:
            found = await self.jobs.get(item.job_id)
            if found is not None:
                return found[0]
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)  # the gateway writes it right after the PubAck
        info = lifecycle.enqueue(item.job_id, item.request, created_at=item.created_at, stream_seq=seq)
        await self.jobs.create(info)
        found = await self.jobs.get(item.job_id)
        return found[0] if found else info

    async def _take(self, msg: Msg, *, piece: bool = False) -> None:
        """One message, kept alive from the moment it is taken until it is settled: a slow
        step before the start (a leader election) must not get it redelivered to a second
        worker while this one goes on."""
        settled = asyncio.Event()
        keep_alive = asyncio.create_task(self._keep_alive(msg, settled))
        try:
            if piece:
                await sharded.handle_piece_message(self, msg)
            else:
                await self._handle(msg)
        finally:
            settled.set()
            keep_alive.cancel()
            await asyncio.wait([keep_alive], timeout=10)

    async def _handle(self, msg: Msg) -> None:
        """Settle the message at once if there is nothing to run, else run its job."""
        meta = msg.metadata
        try:
            item = decode(msg.data, WorkItem)
        except (msgspec.DecodeError, ValueError) as exc:
            await self._refuse_unreadable(msg, exc)
            return
        info = await self._record_of(item, meta.sequence.stream)
        job_id = info.job_id
        # Attempts count starts, not deliveries: a job handed back before it started (this
        # worker could not run it) has not been tried.
        attempt = info.attempts + 1
        if info.status in TERMINAL:
            # Finished before (a crash between the record and the ack, or cancelled while
            # queued): make sure the terminal event exists, then let the message go.
            await self.recorder.ensure_terminal_event(info, patient=True)
            await msg.ack()
            return
        if info.pieces and info.status == "running":
            # A sharded job planned before (its planner died before the ack): queue what waits.
            await sharded.queue_pieces(self, msg, info)
            return
        with contextlib.suppress(Exception):
            self.ack_wait = await self.topology.ack_wait_of(self.js, self.pool)
        await self.recorder.ensure_queued_event(
            info, bound=min(self.settings.connection.request_timeout, self.ack_wait / 3)
        )
        if info.status == "cancelling":
            await self._conclude(msg, job_id, Cancellation(reason="cancelled before it started"))
            return
        if attempt > self.settings.worker.max_attempts:
            reason = (
                f"gave up after {attempt - 1} attempts (max_attempts={self.settings.worker.max_attempts}); "
                f"the last worker was {info.worker or 'unknown'}"
            )
            await self._conclude(msg, job_id, Failure(error=reason))
            return
        if info.request is None:
            await self._conclude(msg, job_id, Failure(error="the job's stored request is not valid here"))
            return
        unable = cannot_run(self.registration.info, info.request)
        if unable is not None:
            await self._hand_on(msg, info, unable, deliveries=meta.num_delivered or 1)
            return
        try:
            policy = await load_policy(self.js, self.topology, self.pool)
        except Exception as exc:  # NATS away: decide on the next delivery, not on a guess
            log.warning("job %s: could not read the pool's policy (%s); handing it back", job_id, exc)
            await msg.nak(delay=_HAND_BACK_DELAY)
            return
        # The gateway checked the request; this machine's disk may say otherwise (a symlink).
        # lmms-eval runs in the job's own folder (empty when it starts): a relative name is
        # looked up there.
        folder = self.results_root / (info.request.output_dir or "") / job_id
        refused = recheck(info.request, policy, cwd=folder)
        if refused is not None:
            await self._conclude(msg, job_id, Failure(error=f"the policy of pool {self.pool!r} refuses it: {refused}"))
            return
        missing = missing_model(info.request)
        if missing is not None:
            await self._conclude(msg, job_id, Failure(error=missing))
            return
        limit_s = effective_timeout(info.request, policy)
        started = now()
        moved = await self.recorder.record(
            job_id,
            lambda record: lifecycle.start(record, attempt=record.attempts + 1, worker=self.worker_id, at=started),
            repair=True,
        )
        if isinstance(moved, Applied):
            attempt = moved.after.attempts
        if isinstance(moved, Applied) and moved.before.status == "running":
            # Announced only once this worker has it: a refused start restarts nothing.
            reason = (
                f"worker {moved.before.worker} stopped answering during attempt {moved.before.attempts}; redelivered"
            )
            await self.recorder.announce(
                lifecycle.requeued_event(moved.before, attempt=attempt, worker=self.worker_id, reason=reason, at=now())
            )
        if isinstance(moved, Refused):
            if moved.current is not None and moved.current.status == "cancelling":
                await self._conclude(msg, job_id, Cancellation(reason="cancelled before it started"))
            else:
                await msg.ack()  # terminal already (its event made sure of by the recorder): nothing to run
            return
        self.current = _Current(info=moved.after, msg=msg, attempt=attempt, limit_s=limit_s)
        if self.stopping:
            self._stop_job(self.current)
        if self.registration.wanted:
            with contextlib.suppress(Exception):
                await self.registration.put(current_job=job_id)
        if info.request.shards > 1:
            await sharded.plan_job(self, self.current)
        else:
            await self._supervise(self.current)

    # --- supervising one evaluation ------------------------------------------------------

    async def _supervise(self, current: _Current) -> None:
        """Run the job's evaluation to its end, a cancel, or a hand-back; then settle the message."""
        info = current.info
        assert info.request is not None
        output = self._output_dir(info)
        begun = time.monotonic()
        launched_at = time.time()
        if isinstance(output, str):
            await self._conclude(current.msg, info.job_id, Failure(error=output))
            return
        log_path = output / "eval.log"

        async def announce() -> None:
            reused, load_s = current.model if current.model is not None else (None, None)
            event = lifecycle.started_event(
                info, worker=self.worker_id, at=now(), model_reused=reused, model_load_seconds=load_s
            )
            await self.recorder.announce(event)

        args = lmms_eval_args(info.request, output_path=output, include_path=self.include_dir)
        exit_code = await self._evaluate(current, Launch(args=args, cwd=output, log_path=log_path), announce)
        outcome: Outcome
        if exit_code is None:
            outcome = Failure(error=f"the evaluation could not start: {current.launch_error}")
        elif current.cancel.is_set():
            outcome = self._cancellation(current)
        elif current.timed_out.is_set():
            outcome = await self._timeout_failure(current, info.job_id, log_path, exit_code)
        elif current.requeue.is_set():
            await self._requeue(current, f"worker {self.worker_id} is shutting down")
            return
        else:
            outcome = await outcome_of(
                output,
                log_path,
                exit_code,
                job_id=info.job_id,
                put=self._store_artifact,
                duration_s=round(time.monotonic() - begun, 3),
                tail_lines=self.settings.worker.log_tail_lines,
                started_at=launched_at,
            )
        await self._conclude(current.msg, info.job_id, outcome)

    def _cancellation(self, current: _Current) -> Cancellation:
        latency = None
        ended_at = current.process.ended_at if current.process is not None else None
        if current.cancel_requested_at is not None and ended_at is not None:
            latency = round(max(0.0, ended_at - current.cancel_requested_at), 3)
        return Cancellation(reason="cancelled while running", latency_s=latency)

    async def _timeout_failure(self, current: _Current, object_prefix: str, log_path: Path, exit_code: int) -> Failure:
        log_tail = tail(log_path, self.settings.worker.log_tail_lines)
        await upload(self._store_artifact, object_prefix, [(log_path, "eval.log")])
        return Failure(
            error=f"timeout: the evaluation ran longer than its limit of {current.limit_s} s and was stopped",
            exit_code=exit_code,
            log_tail=log_tail,
        )

    async def _evaluate(self, current: _Current, launch: Launch, announce: Callable[[], Awaitable[None]]) -> int | None:
        """Start one evaluation process and supervise it until it ends, is cancelled, runs out
        of time or is handed back (`current` says which); its exit code, or None when it could
        not start (`current.launch_error` says why)."""
        ended = asyncio.Event()
        # Follow the record from here on: a launch may wait for the warm evaluator's imports.
        watcher = asyncio.create_task(self._watch_for_cancel(current, ended))
        waiting: asyncio.Task[int] | None = None
        stop_reasons: list[asyncio.Task[Any]] = []
        try:
            try:
                process = await self._launch(current, launch)
            except (OSError, ZygoteError) as exc:
                current.launch_error = str(exc)
                return None
            current.process = process
            waiting = asyncio.create_task(process.wait())
            stop_reasons = [asyncio.create_task(current.cancel.wait()), asyncio.create_task(current.requeue.wait())]
            if current.limit_s is not None:
                stop_reasons.append(asyncio.create_task(self._time_limit(current)))
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
                    current.model = (got.reused, got.seconds)
                # Announced after the launch, so a follower that sees it can act on the process.
                await announce()
                current.announced = True
                await asyncio.wait([waiting, *stop_reasons], return_when=asyncio.FIRST_COMPLETED)
            if not loading.done():
                loading.cancel()
            if not waiting.done():
                await process.terminate(self.settings.worker.cancel_grace)
            return await waiting
        finally:
            ended.set()
            current.announced = False
            if current.reports:
                # Each report's requests are bounded by their own timeouts.
                await asyncio.wait(current.reports)
            pending: list[asyncio.Task[Any]] = [watcher, *stop_reasons]
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=10)
            if waiting is not None and not waiting.done():
                if current.process is not None:
                    await current.process.terminate(0.5)
                waiting.cancel()

    async def _launch(self, current: _Current, launch: Launch) -> EvalProcess | WarmProcess | ResidentJob:
        """Fork the evaluation from the warm evaluator where it can run there, else start a fresh process."""
        request = current.info.request
        assert request is not None
        job_id = current.info.job_id

        def on_progress(progress: Progress) -> None:
            self._on_progress(current, progress)

        several = request.num_gpus > 1 and launch.per_gpu
        if self._loads_model(launch):
            resident = await self._resident_for(request, launch)
            if resident is not None:
                job = await resident.run(
                    launch.module, launch.args, cwd=launch.cwd, log_path=launch.log_path, on_progress=on_progress
                )
                log.info(
                    "job %s attempt %d: resident pid %s: %s", job_id, current.attempt, job.pid, " ".join(launch.args)
                )
                return job
        if self.warm is not None and not several and self.warm.failures < _ZYGOTE_STARTS:
            try:
                warm = await self.warm.launch(
                    launch.args, cwd=launch.cwd, log_path=launch.log_path, on_progress=on_progress, module=launch.module
                )
                log.info(
                    "job %s attempt %d: pid %s (warm): %s", job_id, current.attempt, warm.pid, " ".join(launch.args)
                )
                return warm
            except (ZygoteError, OSError) as exc:
                log.warning("warm evaluator unavailable (%s); starting a fresh lmms-eval process", exc)
        command = evaluator_command(request, self.settings.worker.evaluator, module=launch.module, several=several)
        argv = command + launch.args
        env = scrubbed_env(os.environ)
        process = EvalProcess(argv, env=env, cwd=launch.cwd, log_path=launch.log_path, on_progress=on_progress)
        await process.start()
        log.info("job %s attempt %d: pid %s: %s", job_id, current.attempt, process.pid, " ".join(argv))
        return process

    @staticmethod
    def _loads_model(launch: Launch) -> bool:
        """lmms-eval, or a sharded job's piece: the runs that build a model (a plan or a merge does not)."""
        return launch.module == "lmms_eval" or (launch.module == sharded.SHARDED_MODULE and launch.per_gpu)

    async def _resident_for(self, request: EvaluateRequest, launch: Launch) -> Resident | None:
        """The resident process for this job's model, started if need be; None where the job
        runs elsewhere (after the resident model is released, since this job loads another)."""
        key = resident_key(request)
        fits = (
            self.settings.worker.resident_model
            and self.warm is not None
            and self.warm.failures < _ZYGOTE_STARTS
            and request.num_gpus <= 1
        )
        current = self.resident
        if current is not None and (not fits or current.key != key or request.fresh_model or not current.alive):
            self.resident = None
            await current.close()
        if not fits or self.warm is None:
            return None
        if self.resident is None:
            resident = Resident(key, self.warm, cwd=self.state_dir, log_path=self.state_dir / "resident.log")
            try:
                await resident.start()
            except (ZygoteError, OSError) as exc:
                log.warning("resident model process unavailable (%s); the job runs on its own", exc)
                return None
            self.resident = resident
        return self.resident

    async def release_idle_model(self) -> None:
        """Release the resident model after `resident_idle` seconds without a job."""
        idle = self.settings.worker.resident_idle
        resident = self.resident
        if idle is None or resident is None or resident._busy.locked():
            return
        if time.monotonic() - resident.last_used >= idle:
            self.resident = None
            log.info("releasing the resident model after %.0f s idle", idle)
            await resident.close()

    def _fresh_dir(self, path: Path) -> Path:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _output_dir(self, info: JobInfo, *, fresh: bool = True) -> Path | str:
        """This job's own folder, made empty for this attempt; or why there can be none.

        `<results root>/<output_dir>/<job_id>`: no segment of `output_dir` may look like a
        job id (the gateway refuses one; a message from before that rule is refused here),
        so no job's folder is ever inside another's, and results are read only from here.
        """
        assert info.request is not None
        root = self.results_root.resolve()
        parts = Path(info.request.output_dir or "").parts
        if any(JOB_ID_SEGMENT.fullmatch(part) for part in parts):
            return "output_dir names a folder shaped like a job id; each job's folder is its own"
        # A symlink planted under the root must not lead the job (or its upload) outside:
        # resolve before creating anything, and again after.
        output = (root / Path(*parts) / info.job_id).resolve() if parts else (root / info.job_id).resolve()
        if not output.is_relative_to(root):
            return "output_dir resolves outside the results root"
        if output.exists() and fresh:
            # An earlier attempt's files must not pass for this one's results.
            shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True, exist_ok=True)
        output = output.resolve()
        if not output.is_relative_to(root) or (fresh and any(output.iterdir())):
            return "the job's output folder could not be made empty"
        return output

    async def _time_limit(self, current: _Current) -> None:
        assert current.limit_s is not None
        await asyncio.sleep(current.limit_s)  # the job's time limit itself
        current.timed_out.set()

    async def _keep_alive(self, msg: Msg, settled: asyncio.Event) -> None:
        """Restart the message's ack timer until the job is settled, uploads and all."""
        while not settled.is_set():
            # Four times per ack_wait: a missed beat or two still does not get it redelivered.
            await asyncio.sleep(max(0.5, self.ack_wait / 4))
            try:
                await msg.in_progress()
            except Exception as exc:
                log.warning("in_progress failed: %s", exc)

    async def _watch_for_cancel(self, current: _Current, ended: asyncio.Event) -> None:
        """Watch the job's record; a `cancelling` status ends the evaluation."""
        while not ended.is_set():
            watcher = None
            try:
                watcher = await self.jobs.kv.watch(current.info.job_id)
                # Setting up a watch can swallow a cancellation: look again before waiting on it.
                if ended.is_set():
                    return
                async for entry in watcher:
                    if entry is None or not entry.value:
                        continue
                    record = decode(entry.value, JobInfo)
                    # A piece also stops when its job ended without it (another piece failed).
                    if record.status == "cancelling" or (current.piece is not None and record.status in TERMINAL):
                        current.cancel_requested_at = asyncio.get_running_loop().time()
                        current.cancel.set()
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnecting: watch again
                log.warning("watching job %s: %s", current.info.job_id, exc)
                await asyncio.sleep(1.0)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()  # type: ignore[no-untyped-call]

    def _on_progress(self, current: _Current, progress: Progress) -> None:
        if not current.announced or current.quiet:
            return
        clock = time.monotonic()
        phase_changed = progress.phase != current.last_phase
        if not phase_changed and clock - current.last_progress_at < self.settings.worker.progress_interval:
            return
        current.last_progress_at = clock
        current.last_phase = progress.phase
        report = asyncio.get_running_loop().create_task(self._report_progress(current, progress))
        current.reports.add(report)
        report.add_done_callback(current.reports.discard)

    async def _report_progress(self, current: _Current, value: Progress) -> None:
        index = current.piece
        change: lifecycle.Change
        if index is None:
            change = lambda info: lifecycle.progress(info, value)  # noqa: E731
        else:
            # A piece reports its share of its documents (a bar may count requests, several per
            # document); the job's progress is the sum over its pieces.
            docs = current.info.pieces[index].docs * min(value.done, value.total) // max(value.total, 1)
            change = lambda info: sharding.piece_progress(info, index, docs)  # noqa: E731

        def event(applied: Applied) -> lifecycle.Event:
            shown = value if index is None else (applied.after.progress or value)
            return lifecycle.progress_event(applied.after, shown, worker=self.worker_id, at=now())

        try:
            await self.recorder.record(current.info.job_id, change, event)
        except Exception as exc:
            log.debug("progress not reported: %s", exc)

    async def _store_artifact(self, name: str, data: bytes) -> None:
        # An evaluation's artifacts are worth its GPU time: wait out a NATS restart.
        await outlast(lambda: self.results.put(name, data), f"upload {name}", self.settings.worker.outage_timeout)

    # --- settling the message --------------------------------------------------------------

    async def _conclude(self, msg: Msg, job_id: str, outcome: Outcome) -> None:
        """Record the outcome (its event with it), then ack; unacked if it could not be recorded."""
        try:
            await self.recorder.finish(job_id, outcome, at=now(), worker=self.worker_id)
        except Exception as exc:
            # Its redelivery finds the record (terminal, or not yet) and comes back here.
            log.warning("could not record the outcome of %s: %s", job_id, exc)
            return
        await outlast(msg.ack, "ack", self.settings.worker.outage_timeout)

    async def _requeue(self, current: _Current, reason: str) -> None:
        """Hand the job back: `queued` again, a `requeued` event, and the message nak'd."""

        def event(applied: Applied) -> lifecycle.Event:
            return lifecycle.requeued_event(
                applied.after, attempt=current.attempt, worker=self.worker_id, reason=reason, at=now()
            )

        try:
            moved = await self.recorder.record(current.info.job_id, lifecycle.requeue, event)
        except Exception as exc:
            log.warning("could not hand back %s: %s", current.info.job_id, exc)
            moved = None
        if isinstance(moved, Refused) and moved.current is not None and moved.current.status == "cancelling":
            await self._conclude(current.msg, current.info.job_id, Cancellation(reason="cancelled during shutdown"))
            return
        await current.msg.nak()
