"""The worker: one durable pull consumer, one job at a time, lmms-eval in a subprocess.

Per job: read the record, compare-and-set it to `running`, publish `started`, run the
evaluation while keeping the message alive (`in_progress`), following the record for a
cancel, and turning tqdm bars into `progress`. The outcome is read from the results file,
recorded with a compare-and-set (so exactly one terminal record and event exist), and
only then is the message acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError, OutboundBufferLimitError, StaleConnectionError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

from .. import __version__
from ..config import Settings
from ..events import EventPublisher
from ..jobstore import JobStore
from ..schemas import (
    TERMINAL,
    Cancelled,
    Completed,
    Event,
    Failed,
    GpuInfo,
    JobInfo,
    JobResult,
    Progress,
    ProgressEvent,
    Queued,
    Requeued,
    Started,
    WorkerInfo,
    WorkItem,
    decode,
    encode,
    now,
)
from ..topology import Topology
from .argv import evaluator_command, lmms_eval_args, scrubbed_env
from .results import collect, metrics_of, safe_name, tail
from .runner import EvalProcess
from .taskpaths import build_include_dir
from .warm import WarmEvaluator, WarmProcess, ZygoteError

__all__ = ["Worker"]

log = logging.getLogger("evalq.worker")

_INVENTORY_MARK = "@@EVALQ-INVENTORY@@"
# A zygote that fails to start this many times in a row is given up on.
_ZYGOTE_STARTS = 3
# Errors that mean "NATS is away for now", as during a server restart: worth waiting out.
_OUTAGE = (
    NatsTimeout,
    asyncio.TimeoutError,
    NoRespondersError,
    ServiceUnavailableError,
    NoStreamResponseError,  # a publish that met no stream leader (a node is down)
    ConnectionClosedError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
T = TypeVar("T")
E = TypeVar("E", ProgressEvent, Requeued, Started)


@dataclass
class _Current:
    """The job in hand, and why it may have to stop early."""

    info: JobInfo
    msg: Msg
    attempt: int
    process: EvalProcess | WarmProcess | None = None
    cancel_requested_at: float | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    requeue: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    last_progress_at: float = 0.0
    last_phase: str = ""


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
        self.js = nc.jetstream(timeout=settings.request_timeout)
        self.pool = settings.pool
        host = socket.gethostname()
        self.worker_id = settings.worker_id or re.sub(
            r"[^A-Za-z0-9_\-]", "-", f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.events = EventPublisher(nc, self.topology, timeout=settings.request_timeout)
        self.results_root = settings.results_root
        self.state_dir = settings.home_path / "worker" / self.worker_id
        self.info = WorkerInfo(
            worker_id=self.worker_id, host=host, pid=os.getpid(), pool=self.pool, version=__version__, started_at=now()
        )
        self.current: _Current | None = None
        self.jobs_run = 0
        self._stopping = asyncio.Event()
        self._closed = False  # set by stop(); heartbeats go on while a stopping worker finishes its job
        self._tasks: list[asyncio.Task[None]] = []
        self._signals: list[int] = []
        self.warm: WarmEvaluator | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> Worker:
        await self.topology.ensure(self.js, pools=(self.pool,))
        self.jobs = JobStore(await self.js.key_value(self.topology.jobs_bucket))
        self.workers_kv = await self.js.key_value(self.topology.workers_bucket)
        self.results = await self.js.object_store(self.topology.results_bucket)
        self.sub = await self.js.pull_subscribe_bind(self.topology.consumer, self.topology.work_stream(self.pool))
        self.results_root.mkdir(parents=True, exist_ok=True)
        self.include_dir = build_include_dir(self.state_dir / "tasks", self.settings.task_paths)
        if self.settings.warm_evaluator and not self.settings.evaluator and sys.platform == "linux":
            self.warm = WarmEvaluator(
                self.include_dir, env=scrubbed_env(os.environ), log_path=self.state_dir / "zygote.log"
            )
            self.warm.start()  # warms up while the worker waits for its first job
        await self._register()
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        if self.settings.advertise_inventory:
            self._tasks.append(asyncio.create_task(self._take_inventory(), name="inventory"))
        if self.settings.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                self._signals.append(sig)
        log.info("worker %s serving pool %s", self.worker_id, self.pool)
        return self

    async def stop(self) -> None:
        self.request_stop()
        self._closed = True
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
            await self.workers_kv.delete(self.worker_id)
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()
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
        if self.settings.shutdown_mode == "requeue":
            current.requeue.set()
        else:
            asyncio.get_running_loop().call_later(self.settings.grace, current.requeue.set)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # --- registration ----------------------------------------------------------------

    async def _register(self) -> None:
        self.info = msgspec.structs.replace(
            self.info, heartbeat_at=now(), current_job=self.current.info.job_id if self.current else None
        )
        await self.workers_kv.put(self.worker_id, encode(self.info))

    async def _heartbeat(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.heartbeat)  # the heartbeat period itself
            try:
                await self._register()
            except Exception as exc:  # a NATS outage must not end the heartbeat
                log.warning("heartbeat failed: %s", exc)

    async def _take_inventory(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "evalq.worker.inventory",
            str(self.include_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=scrubbed_env(os.environ),
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 300)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("listing models and tasks took over 300 s; not advertising them")
            return
        text = out.decode(errors="replace")
        if _INVENTORY_MARK not in text:
            log.warning("could not list models and tasks (exit %s)", proc.returncode)
            return
        data = json.loads(text.rsplit(_INVENTORY_MARK, 1)[1])
        gpus = [msgspec.convert(g, GpuInfo) for g in data.get("gpus", [])]
        self.info = msgspec.structs.replace(
            self.info,
            lmms_eval_version=data.get("lmms_eval_version"),
            gpus=gpus,
            gpu_count=len(gpus),
            models=data.get("models", []),
            tasks=data.get("tasks", []),
        )
        await self._register()
        log.info("advertising %d models and %d tasks", len(self.info.models or []), len(self.info.tasks or []))

    # --- the pull loop -------------------------------------------------------------------

    async def run(self, *, max_jobs: int | None = None) -> None:
        """Take jobs one at a time until stopped (or after `max_jobs`)."""
        while not self.stopping and (max_jobs is None or self.jobs_run < max_jobs):
            try:
                msgs = await self.sub.fetch(1, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # e.g. disconnected: wait for the reconnect
                log.warning("fetch failed: %s", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 1.0)
                continue
            for msg in msgs:
                if self.stopping:
                    await msg.nak()  # taken while stopping: hand it straight back
                    continue
                try:
                    await self.handle(msg)
                except Exception:
                    log.exception("job handling failed; the message will be redelivered")
                finally:
                    self.current = None
                    self.jobs_run += 1
                    with contextlib.suppress(Exception):
                        await self._register()  # no longer advertise the finished job

    async def _record(self, item: WorkItem, seq: int) -> JobInfo:
        """The job's record; created from the message if the gateway never wrote it."""
        deadline = time.monotonic() + 5.0
        while True:
            found = await self.jobs.get(item.job_id)
            if found is not None:
                return found[0]
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)  # the gateway writes it right after the PubAck
        info = JobInfo(
            job_id=item.job_id,
            status="queued",
            created_at=item.created_at,
            request=item.request,
            stream_seq=seq,
            labels=item.request.labels,
            pool=item.request.pool,
        )
        await self.jobs.create(info)
        found = await self.jobs.get(item.job_id)
        return found[0] if found else info

    async def handle(self, msg: Msg) -> None:
        meta = msg.metadata
        attempt = meta.num_delivered or 1
        try:
            item = decode(msg.data, WorkItem)
        except (msgspec.DecodeError, ValueError):
            log.error("dropping an unreadable work message (seq %s)", meta.sequence.stream)
            await msg.term()
            return
        info = await self._record(item, meta.sequence.stream)
        job_id = info.job_id

        if info.status in TERMINAL:
            # Finished before (a crash between the record and the ack): make sure the
            # terminal event exists, then let the message go.
            await self._republish_terminal(info)
            await msg.ack()
            return
        # Waiting for the record can take seconds: restart the ack timer before going on.
        with contextlib.suppress(Exception):
            await msg.in_progress()
        # The gateway writes the `queued` event and the record side by side; make sure the
        # event is in the stream before this worker publishes anything after it.
        await self._ensure_queued(info)
        if info.status == "cancelling":
            await self._finish(msg, info, "cancelled", reason="cancelled before it started")
            return
        if attempt > self.settings.max_attempts:
            reason = (
                f"gave up after {attempt - 1} attempts (max_attempts={self.settings.max_attempts}); "
                f"the last worker was {info.worker or 'unknown'}"
            )
            await self._finish(msg, info, "failed", error=reason)
            return
        if info.status == "running":
            await self._publish(
                Requeued(
                    job_id=job_id,
                    time=now(),
                    attempt=attempt,
                    worker=self.worker_id,
                    labels=info.labels,
                    reason=f"worker {info.worker} stopped answering during attempt {info.attempts}; redelivered",
                )
            )

        started = now()

        def to_running(current: JobInfo) -> JobInfo | None:
            if current.status not in ("queued", "running"):
                return None
            return msgspec.structs.replace(
                current, status="running", attempts=attempt, worker=self.worker_id, started_at=started, progress=None
            )

        moved = await self.jobs.transition(job_id, to_running)
        if moved is None:
            latest = await self.jobs.get(job_id)
            if latest is not None and latest[0].status == "cancelling":
                await self._finish(msg, latest[0], "cancelled", reason="cancelled before it started")
            else:
                if latest is not None and latest[0].status in TERMINAL:
                    # Cancelled while queued: the canceller's event may have met a dead node.
                    await self._republish_terminal(latest[0])
                await msg.ack()  # nothing to run
            return
        info = moved[1]
        self.current = _Current(info=info, msg=msg, attempt=attempt)
        if self.stopping:
            self._stop_job(self.current)
        await self._register()
        await self._run(self.current)

    # --- running one job ---------------------------------------------------------------

    async def _run(self, current: _Current) -> None:
        info = current.info
        assert info.request is not None
        output = self._output_dir(info)
        begun = time.monotonic()
        if output is None:
            await self._finish(current.msg, info, "failed", error="output_dir resolves outside the results root")
            return
        log_path = output / "eval.log"
        # Keep the message alive and follow the record from here on: a launch may wait
        # for the warm evaluator to finish its imports.
        helpers = [
            asyncio.create_task(self._keep_alive(current)),
            asyncio.create_task(self._follow_record(current)),
        ]
        waiting: asyncio.Task[int] | None = None
        stop_reasons: list[asyncio.Task[Any]] = []
        try:
            process = await self._launch(current, output, log_path)
            current.process = process
            # `started` follows the launch, so a follower that sees it can act on the process.
            await self._publish(self._event(Started, current))
            waiting = asyncio.create_task(process.wait())
            stop_reasons = [asyncio.create_task(current.cancel.wait()), asyncio.create_task(current.requeue.wait())]
            await asyncio.wait([waiting, *stop_reasons], return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                await process.terminate(self.settings.cancel_grace)
            exit_code = await waiting
        finally:
            current.finished.set()
            pending: list[asyncio.Task[Any]] = [*helpers, *stop_reasons]
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=10)
            if waiting is not None and not waiting.done():
                if current.process is not None:
                    await current.process.terminate(0.5)
                waiting.cancel()

        duration = round(time.monotonic() - begun, 3)
        if current.cancel.is_set():
            latency = None
            if current.cancel_requested_at is not None and process.ended_at is not None:
                latency = round(max(0.0, process.ended_at - current.cancel_requested_at), 3)
            await self._finish(current.msg, info, "cancelled", reason="cancelled while running", latency=latency)
            return
        if current.requeue.is_set():
            await self._requeue(current, f"worker {self.worker_id} is shutting down")
            return
        files = collect(output)
        metrics = None
        problem = "no *_results.json was written"
        if files.results is not None:
            try:
                metrics = metrics_of(files.results)
            except (ValueError, OSError) as exc:
                problem = f"{files.results.name} could not be read: {exc}"
        if metrics is None:
            log_tail = tail(log_path, self.settings.log_tail_lines)
            last = log_tail.splitlines()[-1] if log_tail else ""
            error = f"lmms-eval exited with code {exit_code} and {problem}" + (f": {last}" if last else "")
            await self._upload(info.job_id, [(log_path, "eval.log")])
            await self._finish(current.msg, info, "failed", error=error, exit_code=exit_code, log_tail=log_tail)
            return
        artifacts = [(files.results, "results.json")] if files.results else []
        artifacts += [(sample, f"samples/{safe_name(sample.name)}") for sample in files.samples]
        artifacts.append((log_path, "eval.log"))
        names = await self._upload(info.job_id, artifacts)
        await self._finish(
            current.msg,
            info,
            "completed",
            result=JobResult(metrics=metrics, artifacts=names, duration_s=duration),
        )

    async def _launch(self, current: _Current, output: Path, log_path: Path) -> EvalProcess | WarmProcess:
        """Fork the job from the warm evaluator where it can run there, else start a fresh process."""
        request = current.info.request
        assert request is not None
        args = lmms_eval_args(request, output_path=output, include_path=self.include_dir)
        job_id = current.info.job_id

        def on_progress(progress: Progress) -> None:
            self._on_progress(current, progress)

        if self.warm is not None and request.num_gpus <= 1 and self.warm.failures < _ZYGOTE_STARTS:
            try:
                warm = await self.warm.launch(args, cwd=output, log_path=log_path, on_progress=on_progress)
                log.info("job %s attempt %d: pid %s (warm): %s", job_id, current.attempt, warm.pid, " ".join(args))
                return warm
            except (ZygoteError, OSError) as exc:
                log.warning("warm evaluator unavailable (%s); starting a fresh lmms-eval process", exc)
        argv = evaluator_command(request, self.settings.evaluator) + args
        env = scrubbed_env(os.environ)
        process = EvalProcess(argv, env=env, cwd=output, log_path=log_path, on_progress=on_progress)
        await process.start()
        log.info("job %s attempt %d: pid %s: %s", job_id, current.attempt, process.pid, " ".join(argv))
        return process

    def _output_dir(self, info: JobInfo) -> Path | None:
        assert info.request is not None
        root = self.results_root.resolve()
        # A symlink planted under the root must not lead the job (or its upload) outside:
        # resolve before creating anything, and again after.
        output = (root / (info.request.output_dir or "") / info.job_id).resolve()
        if not output.is_relative_to(root):
            return None
        output.mkdir(parents=True, exist_ok=True)
        output = output.resolve()
        return output if output.is_relative_to(root) else None

    async def _keep_alive(self, current: _Current) -> None:
        period = max(0.5, self.settings.ack_wait / 3)
        while not current.finished.is_set():
            await asyncio.sleep(period)  # well inside ack_wait, so the job is not redelivered
            try:
                await current.msg.in_progress()
            except Exception as exc:
                log.warning("in_progress failed: %s", exc)

    async def _follow_record(self, current: _Current) -> None:
        """Watch the job's record; a `cancelling` status ends the evaluation."""
        while not current.finished.is_set():
            watcher = None
            try:
                watcher = await self.jobs.kv.watch(current.info.job_id)
                # Setting up a watch can swallow a cancellation: look again before waiting on it.
                if current.finished.is_set():
                    return
                async for entry in watcher:
                    if entry is None or not entry.value:
                        continue
                    record = decode(entry.value, JobInfo)
                    if record.status == "cancelling":
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
        clock = time.monotonic()
        phase_changed = progress.phase != current.last_phase
        if not phase_changed and clock - current.last_progress_at < self.settings.progress_interval:
            return
        current.last_progress_at = clock
        current.last_phase = progress.phase
        asyncio.get_running_loop().create_task(self._report_progress(current, progress))

    async def _report_progress(self, current: _Current, progress: Progress) -> None:
        def update(info: JobInfo) -> JobInfo | None:
            return msgspec.structs.replace(info, progress=progress) if info.status == "running" else None

        try:
            await self.jobs.transition(current.info.job_id, update)
            await self._publish(self._event(ProgressEvent, current, progress=progress))
        except Exception as exc:
            log.debug("progress not reported: %s", exc)

    async def _outlast(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        """Run `step`, retrying through a NATS outage (a server restart) for up to `outage_timeout`.

        The evaluation's result is worth hours of GPU time: finishing the bookkeeping late
        beats losing it. Other errors are not retried.
        """
        deadline = time.monotonic() + self.settings.outage_timeout
        delay = 0.2
        while True:
            try:
                return await step()
            except _OUTAGE as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s: NATS unavailable (%s); retrying", what, type(exc).__name__)
                await asyncio.sleep(delay)  # back-off while the client reconnects
                delay = min(delay * 2, 5.0)

    async def _upload(self, job_id: str, files: list[tuple[Path, str]]) -> list[str]:
        names = []
        for path, name in files:
            if path.is_symlink() or not path.is_file():
                continue
            object_name = f"{job_id}/{name}"
            data = path.read_bytes()
            await self._outlast(lambda: self.results.put(object_name, data), f"upload {object_name}")  # noqa: B023
            names.append(object_name)
        return names

    # --- outcomes ------------------------------------------------------------------------

    async def _finish(
        self,
        msg: Msg,
        info: JobInfo,
        status: str,
        *,
        reason: str = "",
        error: str | None = None,
        exit_code: int | None = None,
        log_tail: str | None = None,
        result: JobResult | None = None,
        latency: float | None = None,
    ) -> None:
        """Record the terminal state (compare-and-set), publish its event, then ack."""
        stamp = now()

        def to_terminal(current: JobInfo) -> JobInfo | None:
            if current.status in TERMINAL:
                return None
            return msgspec.structs.replace(
                current,
                status=status,  # type: ignore[arg-type]
                completed_at=stamp,
                result=result,
                error=error if status == "failed" else (reason or None if status == "cancelled" else None),
                progress=current.progress,
            )

        moved = await self._outlast(lambda: self.jobs.transition(info.job_id, to_terminal), "record the outcome")
        try:
            if moved is not None:
                event = self._terminal_event(moved[1], reason, exit_code, log_tail, latency)
                await self._outlast(lambda: self.events.publish(event), "publish the outcome")
            else:
                # Terminal already: another writer's, or ours when a write that timed out had in
                # fact landed. Either way, make sure its event exists.
                latest = await self._outlast(lambda: self.jobs.get(info.job_id), "read the record")
                if latest is not None and latest[0].status in TERMINAL:
                    record = latest[0]
                    ours = record.completed_at == stamp and record.status == status
                    full = self._terminal_event(record, reason, exit_code, log_tail, latency) if ours else None
                    await self._republish_terminal(record, full)
        except Exception as exc:
            # Leave the message unacked: its redelivery finds the terminal record and
            # publishes the missing event (deduplicated by Nats-Msg-Id).
            log.warning("could not publish the outcome of %s: %s", info.job_id, exc)
            return
        await self._outlast(msg.ack, "ack")

    def _terminal_event(
        self, info: JobInfo, reason: str, exit_code: int | None, log_tail: str | None, latency: float | None
    ) -> Event:
        common = dict(
            job_id=info.job_id,
            time=info.completed_at or now(),
            attempt=info.attempts,
            worker=self.worker_id,
            labels=info.labels,
        )
        if info.status == "completed":
            result = info.result or JobResult()
            return Completed(**common, metrics=result.metrics, artifacts=result.artifacts, duration_s=result.duration_s)  # type: ignore[arg-type]
        if info.status == "failed":
            return Failed(**common, error=info.error or "failed", exit_code=exit_code, log_tail=log_tail)  # type: ignore[arg-type]
        return Cancelled(**common, reason=reason or info.error or "cancelled", cancel_latency_s=latency)  # type: ignore[arg-type]

    async def _ensure_queued(self, info: JobInfo) -> None:
        """Publish the job's `queued` event if it is not in the stream (deduplicated by Nats-Msg-Id)."""
        subject = self.topology.event_subject(info.job_id, "queued")
        # Bounded well inside ack_wait: during an outage the job must not wait here so long
        # that it is redelivered to another worker.
        bound = min(self.settings.request_timeout, self.settings.ack_wait / 3)
        try:
            await asyncio.wait_for(self.js.get_last_msg(self.topology.events_stream, subject), bound)
            return
        except NotFoundError:
            pass
        except Exception as exc:
            log.warning("could not look for the queued event of %s: %s", info.job_id, exc)
            return
        queued = Queued(
            job_id=info.job_id, time=info.created_at, labels=info.labels, pool=info.pool, stream_seq=info.stream_seq
        )
        await self._publish(queued)

    async def _republish_terminal(self, info: JobInfo, event: Event | None = None) -> None:
        """Publish a finished job's terminal event unless it is in the stream already.

        Raises if it cannot, so that the caller does not ack: the redelivery tries again.
        """
        for kind in ("completed", "failed", "cancelled"):
            look = functools.partial(
                self.js.get_last_msg, self.topology.events_stream, self.topology.event_subject(info.job_id, kind)
            )
            try:
                await self._outlast(look, f"look for the {kind} event")
                return  # it exists
            except NotFoundError:
                continue
        missing = event or self._terminal_event(info, info.error or "", None, None, None)
        await self._outlast(lambda: self.events.publish(missing), "publish the outcome")

    async def _requeue(self, current: _Current, reason: str) -> None:
        def to_queued(info: JobInfo) -> JobInfo | None:
            if info.status != "running":
                return None
            return msgspec.structs.replace(info, status="queued", worker=None, progress=None)

        moved = await self.jobs.transition(current.info.job_id, to_queued)
        if moved is None:
            latest = await self.jobs.get(current.info.job_id)
            if latest is not None and latest[0].status == "cancelling":
                await self._finish(current.msg, latest[0], "cancelled", reason="cancelled during shutdown")
                return
        await self._publish(self._event(Requeued, current, reason=reason))
        await current.msg.nak()

    def _event(self, kind: type[E], current: _Current, **fields: Any) -> E:
        """An event about the job in hand, stamped with this worker and attempt."""
        return kind(
            job_id=current.info.job_id,
            time=now(),
            attempt=current.attempt,
            worker=self.worker_id,
            labels=current.info.labels,
            **fields,
        )

    async def _publish(self, event: Event) -> bool:
        try:
            await self.events.publish(event)
        except Exception as exc:
            log.warning("could not publish %s for %s: %s", type(event).__name__, event.job_id, exc)
            return False
        return True
