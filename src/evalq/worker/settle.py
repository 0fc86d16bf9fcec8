"""Settling what a worker took: a job's outcome recorded and then its message acked, a job
handed back, its folder on disk, and its files in the results store.

The order is the guarantee: an outcome is in the record (and its event in the stream)
before the message goes; one that cannot be recorded leaves the message unacked, so that
its redelivery comes back to record it. Every step here waits out a NATS restart
(`outage_timeout`): an evaluation's outcome and artifacts are worth its GPU time.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg

from .. import lifecycle
from ..fields import JOB_ID_SEGMENT
from ..lifecycle import Applied, Cancellation, Failure, Outcome, Recorder, Refused
from ..outage import outlast
from ..schemas import JobInfo, WorkItem, decode, now

__all__ = ["Settler"]

log = logging.getLogger("evalq.worker")

# Deliveries whose handling raised before the job's outcome was known, after which it fails.
_BROKEN = 10


class Settler:
    """Where a worker's messages are settled and its jobs' files kept.

    `recorder` writes the record and its events; `results` is the results object store.
    """

    def __init__(
        self, recorder: Recorder, results: Any, *, worker_id: str, results_root: Path, outage_timeout: float
    ) -> None:
        self.recorder = recorder
        self.results = results
        self.worker_id = worker_id
        self.results_root = results_root
        self.outage_timeout = outage_timeout

    # --- the message -----------------------------------------------------------------------

    async def conclude(self, msg: Msg, job_id: str, outcome: Outcome) -> None:
        """Record the outcome (its event with it), then ack; unacked if it could not be recorded."""
        try:
            await self.recorder.finish(job_id, outcome, at=now(), worker=self.worker_id)
        except Exception as exc:
            # Its redelivery finds the record (terminal, or not yet) and comes back here.
            log.warning("could not record the outcome of %s: %s", job_id, exc)
            return
        await self.ack(msg)

    async def ack(self, msg: Msg) -> None:
        """Let the message go, through an outage if need be."""
        await outlast(msg.ack, "ack", self.outage_timeout)

    async def requeue(self, msg: Msg, job_id: str, *, attempt: int, reason: str) -> None:
        """Hand the job back: `queued` again, a `requeued` event, and the message nak'd."""

        def event(applied: Applied) -> lifecycle.Event:
            return lifecycle.requeued_event(
                applied.after, attempt=attempt, worker=self.worker_id, reason=reason, at=now()
            )

        try:
            moved = await self.recorder.record(job_id, lifecycle.requeue, event)
        except Exception as exc:
            log.warning("could not hand back %s: %s", job_id, exc)
            moved = None
        if isinstance(moved, Refused) and moved.current is not None and moved.current.status == "cancelling":
            await self.conclude(msg, job_id, Cancellation(reason="cancelled during shutdown"))
            return
        await msg.nak()

    async def preempt(self, msg: Msg, job_id: str, *, attempt: int) -> None:
        """Give the job back to the scheduler: waiting again (not admitted), a `requeued`
        event, and the message acked; the dispatcher admits it anew when its turn comes, and
        its journal resumes it."""

        def event(applied: Applied) -> lifecycle.Event:
            reason = "preempted: a job of higher priority needed this worker"
            return lifecycle.requeued_event(
                applied.after, attempt=attempt, worker=self.worker_id, reason=reason, at=now()
            )

        moved = await self.recorder.record(job_id, lifecycle.preempt, event, patient=True)
        if isinstance(moved, Refused) and moved.current is not None and moved.current.status == "cancelling":
            await self.conclude(msg, job_id, Cancellation(reason="cancelled while being preempted"))
            return
        await self.ack(msg)

    async def refuse_unreadable(self, msg: Msg, exc: Exception) -> None:
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
                found = await self.recorder.jobs.get(job_id)
        if found is not None:
            await self.conclude(msg, found[0].job_id, Failure(error=f"the job's request is not valid here: {exc}"))
            return
        await msg.term()

    async def after_error(self, msg: Msg, exc: Exception) -> None:
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
            await self.conclude(msg, job_id, Failure(error=reason))

    # --- the job's files -------------------------------------------------------------------

    def output_dir(self, info: JobInfo, *, fresh: bool = True) -> Path | str:
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

    @staticmethod
    def fresh_dir(path: Path) -> Path:
        """`path`, emptied of what an earlier attempt left there."""
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def store(self, name: str, data: bytes) -> None:
        """Put one artifact in the results store."""
        await outlast(lambda: self.results.put(name, data), f"upload {name}", self.outage_timeout)

    async def fetch(self, name: str, what: str) -> bytes:
        """Read one artifact back from the results store (`what` names it in the log)."""
        got = await outlast(lambda: self.results.get(name), what, self.outage_timeout)
        return got.data or b""
