"""The worker: the pull loop of its pool's durable consumers, one message at a time.

Per message: take it, keep it alive (`in_progress`) until it is settled, and decide what it
needs (the steps are in `_handle`): nothing to run, a hand-back, a failure with its reason,
or a start (`lifecycle.start`). A started job's evaluation is supervised by
`evaluation.Evaluation`, a sharded job's steps are `sharded.ShardedSteps`, and the message
is settled by `settle.Settler` (the outcome recorded, then the ack). Every change of a job's
record goes through `lifecycle.Recorder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import socket
import time
import uuid
from types import TracebackType

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from .. import __version__, lifecycle
from ..config import Settings
from ..events import EventPublisher
from ..jobstore import JobStore
from ..lifecycle import Applied, Cancellation, Failure, Recorder, Refused
from ..metrics import WorkerMetrics
from ..policy import effective_cache, effective_timeout, load_policy, missing_model, recheck
from ..registry import Registry, cannot_run
from ..schemas import TERMINAL, JobInfo, WorkerInfo, WorkItem, decode, now
from ..topology import Topology
from .evaluation import Evaluation, RunningJob
from .gpu_memory import GpuMemory
from .intake import Intake
from .journal_stream import Journal
from .keepalive import KeepAlive
from .launch import Launcher
from .pod_cost import PodCost
from .registration import Registration
from .resident import Resident
from .settle import Settler
from .sharded import ShardedSteps
from .taskpaths import build_include_dir
from .warm import WarmEvaluator

__all__ = ["Worker"]

log = logging.getLogger("evalq.worker")

# A job this worker cannot run goes back to the queue after this delay, doubling with each
# delivery up to ack_wait, so that a worker that can run it takes it when it is free.
_HAND_BACK_DELAY = 1.0


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
        self.gpu_memory = GpuMemory()
        self.metrics = WorkerMetrics(
            self.pool, busy=lambda: self.current is not None, gpus=lambda: self.gpu_memory.values
        )
        self.events = EventPublisher(
            nc, self.topology, timeout=settings.connection.request_timeout, domain=domain, observe=self.metrics.observe
        )
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
            pod_cost=PodCost.from_env(),
        )
        # The consumer's ack_wait as the server has it: the keep-alive follows it, whatever
        # this worker's own setting says.
        self.keep_alive = KeepAlive(
            nc,
            self.js,
            self.topology,
            pool=self.pool,
            worker_id=self.worker_id,
            ack_wait=settings.queue.ack_wait,
            timeout=settings.connection.request_timeout,
            current_job=self._current_job_id,
        )
        self.current: RunningJob | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._signals: list[int] = []
        self.launcher = Launcher(settings, state_dir=self.state_dir)

    @property
    def info(self) -> WorkerInfo:
        return self.registration.info

    @property
    def ack_wait(self) -> float:
        """The ack_wait this worker keeps its message alive for (see `keepalive.py`)."""
        return self.keep_alive.ack_wait

    @property
    def warm(self) -> WarmEvaluator | None:
        return self.launcher.warm

    @property
    def resident(self) -> Resident | None:
        return self.launcher.resident

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> Worker:
        await self.topology.ensure(self.js, pools=(self.pool,))
        # Listening before the first fetch: no message is taken that an announcement could miss.
        if await self.keep_alive.start() != self.settings.queue.ack_wait:
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
        self.settler = Settler(
            self.recorder,
            await self.js.object_store(self.topology.results_bucket),
            worker_id=self.worker_id,
            results_root=self.results_root,
            outage_timeout=self.settings.worker.outage_timeout,
        )
        self.sub = await self.js.pull_subscribe_bind(self.topology.consumer, self.topology.work_stream(self.pool))
        self.pieces = await self.js.pull_subscribe_bind(self.topology.consumer, self.topology.pieces_stream(self.pool))
        self.intake = await Intake(
            self.nc,
            self.sub,
            self.pieces,
            jobs_subjects=self.topology.work_subjects(self.pool),
            pieces_subjects=self.topology.pieces_subjects(self.pool),
        ).start()
        self.results_root.mkdir(parents=True, exist_ok=True)
        self.include_dir = build_include_dir(self.state_dir / "tasks", self.settings.worker.task_paths)
        self.launcher.start(self.include_dir)
        self.evaluation = Evaluation(
            self.settings,
            self.launcher,
            self.recorder,
            self.jobs,
            self.settler,
            Journal(self.nc, self.topology, timeout=self.settings.connection.request_timeout),
            worker_id=self.worker_id,
            include_dir=self.include_dir,
        )
        self.sharded = ShardedSteps(
            self.nc,
            self.js,
            self.topology,
            self.settings,
            registration=self.registration,
            recorder=self.recorder,
            settler=self.settler,
            evaluation=self.evaluation,
            hold=self.hold,
        )
        if self.settings.worker.advertise_inventory:
            # Listed only with its inventory: see registration.py.
            listing = self.registration.advertise_inventory(self.include_dir, self.warm, self._current_job_id)
            self._tasks.append(asyncio.create_task(listing, name="inventory"))
        else:
            await self.registration.put(current_job=None)
        self._tasks.append(asyncio.create_task(self.registration.beat(self._current_job_id), name="heartbeat"))
        self._tasks.append(asyncio.create_task(self.gpu_memory.poll(), name="gpu-memory"))
        if self.settings.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                self._signals.append(sig)
        await self.registration.show(None)  # idle: in a pod, the first to go in a scale-down
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
            await self.intake.stop()
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.pieces.unsubscribe()
        await self.keep_alive.stop()
        await self.launcher.close()

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

    def _stop_job(self, job: RunningJob) -> None:
        if self.settings.worker.shutdown_mode == "requeue":
            job.requeue.set()
        else:
            asyncio.get_running_loop().call_later(self.settings.worker.grace, job.requeue.set)

    def hold(self, job: RunningJob) -> None:
        """Make `job` the one in hand: a stop asked for before or after reaches it."""
        self.current = job
        if self.stopping:
            self._stop_job(job)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _current_job_id(self) -> str | None:
        return self.current.info.job_id if self.current else None

    # --- the pull loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Take jobs one at a time until stopped."""
        while not self.stopping:
            await self.launcher.release_idle_model()
            try:
                msgs, is_piece = await self.intake.next(until=self._stopping)
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
                    await self.settler.after_error(msg, exc)
                finally:
                    self.current = None
                    await self.registration.show(None)  # no longer advertise the job

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
        await self.settler.conclude(msg, info.job_id, Failure(error=why))

    async def _peers(self) -> list[WorkerInfo]:
        """The other live workers of this pool, as the workers bucket holds them. A read that
        fails raises: the job is not failed for want of a peer that a slow server hid."""
        kv = await self.js.key_value(self.topology.workers_bucket)
        return [w for w in await Registry.read(kv) if w.worker_id != self.worker_id and w.pool == self.pool]

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
        async with self.keep_alive.holding(msg):
            if piece:
                await self.sharded.handle_message(msg)
            else:
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        """Settle the message at once if there is nothing to run, else run its job."""
        meta = msg.metadata
        try:
            item = decode(msg.data, WorkItem)
        except (msgspec.DecodeError, ValueError) as exc:
            await self.settler.refuse_unreadable(msg, exc)
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
            await self.sharded.queue_pieces(msg, info)
            return
        # The keep-alive reads the consumer's ack_wait as it takes the message: none here.
        await self.recorder.ensure_queued_event(
            info, bound=min(self.settings.connection.request_timeout, self.ack_wait / 3)
        )
        if info.status == "cancelling":
            await self.settler.conclude(msg, job_id, Cancellation(reason="cancelled before it started"))
            return
        # A start that a higher priority preempted was not a failed try.
        if attempt - info.preemptions > self.settings.worker.max_attempts:
            reason = (
                f"gave up after {attempt - 1} attempts (max_attempts={self.settings.worker.max_attempts}); "
                f"the last worker was {info.worker or 'unknown'}"
            )
            await self.settler.conclude(msg, job_id, Failure(error=reason))
            return
        if info.request is None:
            await self.settler.conclude(msg, job_id, Failure(error="the job's stored request is not valid here"))
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
            await self.settler.conclude(
                msg, job_id, Failure(error=f"the policy of pool {self.pool!r} refuses it: {refused}")
            )
            return
        # A re-score loads no model: its checkpoint may be gone.
        missing = missing_model(info.request) if info.request.rescore_of is None else None
        if missing is not None:
            await self.settler.conclude(msg, job_id, Failure(error=missing))
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
                await self.settler.conclude(msg, job_id, Cancellation(reason="cancelled before it started"))
            else:
                await msg.ack()  # terminal already (its event made sure of by the recorder): nothing to run
            return
        job = RunningJob(
            info=moved.after,
            msg=msg,
            attempt=attempt,
            limit_s=limit_s,
            stall_after_s=policy.stall_after_s,
            stall_action=policy.stall_action,
            cache=effective_cache(info.request, policy),
        )
        self.hold(job)
        await self.registration.show(job_id)
        if info.request.shards > 1:
            await self.sharded.plan(job)
        else:
            await self.evaluation.supervise(job)
