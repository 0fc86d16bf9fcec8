"""`AsyncClient`: submit jobs, follow their events, fetch results. Never polls.

Method names follow lmms-eval's `EvalClient` (`evaluate`, `get_job`, `cancel_job`,
`wait_for_job`, `health`, `is_healthy`, `list_tasks`, `list_models`), so switching is a
change of import; every return value is a typed Struct.

Every public method raises `EvalqError`s only: `_as_evalq_error` is the one place where what
nats-py raises (timeouts, no responders, a closed connection, JetStream's API errors)
becomes the evalq error that says what to do about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.js.api import ObjectInfo
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ..config import Settings, load_settings
from ..connection import HINT, connect
from ..errors import (
    AmbiguousJobId,
    ConnectError,
    EvalqError,
    InvalidField,
    JobCancelled,
    JobFailed,
    JobNotFound,
    RequestError,
    Timeout,
    Unavailable,
)
from ..fields import ID_PREFIX, JOB_ID
from ..schemas import (
    TERMINAL,
    Cancelled,
    CancelReply,
    Completed,
    EvaluateRequest,
    Event,
    Failed,
    Health,
    JobAccepted,
    JobInfo,
    JobsPage,
    JobSummary,
    ModelsReply,
    QueueStatus,
    TasksReply,
    TeamsReply,
    decode,
    decode_event,
    encode,
)
from ..topology import Topology
from .gates import Gates
from .notify import Notify
from .reads import Doorbell, Reads

__all__ = ["Artifact", "AsyncClient"]

T = TypeVar("T")
# Candidates an ambiguous short id lists.
_CANDIDATES = 10
_SERVICE_CODE = "Nats-Service-Error-Code"
# nats-py's ways of saying "there is no connection to send this on".
_NO_CONNECTION = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


class _ErrorBody(msgspec.Struct):
    code: int = 500
    message: str = ""
    path: str | None = None


class _ErrorReply(msgspec.Struct):
    error: _ErrorBody


def _as_evalq_error(exc: Exception, what: str, settings: Settings, timeout: float) -> EvalqError | None:
    """The evalq error for what `what` (a subject, a stream, a bucket) raised; None to let it through."""
    if isinstance(exc, EvalqError):
        return exc
    if isinstance(exc, TimeoutError):  # nats-py's timeouts are TimeoutErrors too
        return Timeout(
            f"no answer from {what} within {timeout:g}s: retry, or raise EVALQ_REQUEST_TIMEOUT "
            "(a user without permission to publish there gets no answer either)"
        )
    if isinstance(exc, NoRespondersError):
        return Unavailable(f"no gateway is answering on {what}: start one with `evalq gateway` (or `evalq up`)")
    if isinstance(exc, (ServiceUnavailableError, NoStreamResponseError)):
        domain = f" in domain {settings.connection.js_domain!r}" if settings.connection.js_domain else ""
        return Unavailable(f"JetStream{domain} is not answering for {what}: is it enabled on the server? ({exc})")
    if isinstance(exc, NotFoundError):
        return Unavailable(
            f"{what} does not exist on this server: start a gateway (`evalq gateway`) with prefix "
            f"{settings.queue.prefix!r}, which creates the queue ({exc})"
        )
    if isinstance(exc, _NO_CONNECTION):
        return ConnectError(f"no connection to NATS ({exc}): open a new client; {HINT}")
    if isinstance(exc, msgspec.DecodeError):
        return EvalqError(f"unreadable reply from {what} ({exc}); do the client and the gateway run the same evalq?")
    if isinstance(exc, nats.errors.Error):  # JetStream's errors derive from it too
        return EvalqError(f"NATS refused {what}: {exc}")
    return None


class AsyncClient:
    """A connection to an evalq queue. Use `async with AsyncClient() as client:`.

    Settings come from the same place as the services' (`EVALQ_*`, `evalq.toml`), or pass
    `settings=` or an existing NATS connection `nc=`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        nc: NatsClient | None = None,
        timeout: float | None = None,
        **overrides: Any,
    ) -> None:
        base = settings or load_settings()
        self.settings = base.with_(**overrides) if overrides else base
        self.topology = Topology.from_settings(self.settings)
        self.timeout = timeout or self.settings.connection.request_timeout
        self._nc = nc
        self._owns_connection = nc is None

    # --- lifecycle -------------------------------------------------------------------

    async def connect(self) -> AsyncClient:
        if self._nc is None:
            self._nc = await connect(self.settings, name="evalq-client")
        return self

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and self._owns_connection:
            try:
                await nc.drain()
            except Exception:
                # Draining needs a live connection; without one, closing is what is left to do.
                await nc.close()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise ConnectError(
                "the client is not connected: use `async with AsyncClient() as client:` or `await client.connect()`"
            )
        return self._nc

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """The SDK's error boundary: inside it, nats-py's errors become evalq's."""
        try:
            yield
        except Exception as exc:
            mapped = _as_evalq_error(exc, what, self.settings, self.timeout)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    # --- requests ----------------------------------------------------------------------

    async def _ask(self, endpoint: str, reply: type[T], body: bytes = b"", headers: dict[str, str] | None = None) -> T:
        subject = self.topology.subject(endpoint)
        with self._errors(subject):
            return decode(await self._request(subject, body, headers), reply)

    async def _request(self, subject: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        give_up = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            try:
                reply = await self.nc.request(subject, body, timeout=self.timeout, headers=headers)
                break
            except NoRespondersError:
                # A gateway restarting, or this client reconnecting: its subscriptions are
                # back within moments, so wait for one up to the request timeout.
                if time.monotonic() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if reply.headers and _SERVICE_CODE in reply.headers:
            code = int(reply.headers.get(_SERVICE_CODE) or 500)
            try:
                error = msgspec.json.decode(reply.data, type=_ErrorReply).error
                message, path = error.message, error.path
            except msgspec.DecodeError:
                message, path = reply.headers.get("Nats-Service-Error", "error"), None
            raise RequestError.for_code(code, message, path)
        return reply.data

    async def submit(
        self,
        request: EvaluateRequest | dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        retries: int = 3,
        **fields: Any,
    ) -> JobAccepted:
        """Enqueue a job. Retries a timeout with the same Idempotency-Key, so never twice."""
        if request is None:
            body = encode(fields)
        elif isinstance(request, dict):
            body = encode({**request, **fields})
        else:
            body = encode(request)
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        for attempt in range(retries + 1):
            try:
                return await self._ask("submit", JobAccepted, body, headers)
            except (Timeout, Unavailable):
                if attempt == retries:
                    raise
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))  # back-off before the same-key retry
        raise AssertionError("unreachable")

    async def evaluate(self, model: str, tasks: list[str], **fields: Any) -> JobAccepted:
        """lmms-eval's `EvalClient.evaluate`: same arguments, returns the JobAccepted."""
        return await self.submit(model=model, tasks=tasks, **fields)

    async def get_job(self, job_id: str) -> JobInfo:
        return await self._ask("status", JobInfo, encode({"job_id": job_id}))

    async def cancel_job(self, job_id: str) -> CancelReply:
        return await self._ask("cancel", CancelReply, encode({"job_id": job_id}))

    async def queue(self) -> QueueStatus:
        return await self._ask("queue", QueueStatus, b"{}")

    get_queue_status = queue

    async def health(self) -> Health:
        return await self._ask("health", Health)

    async def is_healthy(self) -> bool:
        try:
            return (await self.health()).status == "healthy"
        except EvalqError:
            return False

    async def list_tasks(self) -> list[str]:
        return (await self._ask("tasks", TasksReply)).tasks

    async def list_models(self) -> list[str]:
        return (await self._ask("models", ModelsReply)).models

    async def teams(self) -> TeamsReply:
        """Each team's use of each pool (decayed GPU-seconds), its share and its limits; a
        team's member sees only its own rows."""
        return await self._ask("teams", TeamsReply, b"{}")

    @property
    def gates(self) -> Gates:
        """The team's gate policies and its jobs' verdicts (publisher/gates.py)."""
        return Gates(self._ask, self.events)

    @property
    def notify(self) -> Notify:
        """The team's webhook subscriptions (publisher/notify.py)."""
        return Notify(self._ask)

    # --- history -----------------------------------------------------------------------

    async def jobs(
        self,
        *,
        status: str | list[str] | None = None,
        pool: str | None = None,
        labels: dict[str, str] | None = None,
        created_after: str | dt.datetime | None = None,
        created_before: str | dt.datetime | None = None,
        id_prefix: str | None = None,
        metrics: list[str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
        team: str | None = None,
    ) -> JobsPage:
        """One page of the job history, newest first; pass its `next_cursor` for the next.

        Filters all must hold: `status` (one or several), `pool`, `team`, every `labels` pair,
        `created_after` (inclusive) and `created_before` (exclusive), RFC 3339 strings or
        zoned datetimes. `metrics` (`task/metric`, `task/*`, `*`) picks the metrics each
        summary carries. At most 1,000 jobs a page.
        """
        body: dict[str, Any] = {"limit": limit}
        if status is not None:
            body["status"] = [status] if isinstance(status, str) else list(status)
        optional = {
            "pool": pool,
            "labels": labels,
            "created_after": created_after,
            "created_before": created_before,
            "id_prefix": id_prefix,
            "metrics": metrics,
            "cursor": cursor,
            "team": team,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return await self._ask("jobs", JobsPage, encode(body))

    async def iter_jobs(self, *, page_size: int = 1000, **filters: Any) -> AsyncIterator[JobSummary]:
        """Every job matching the filters of `jobs`, newest first, following the cursors."""
        cursor: str | None = None
        while True:
            page = await self.jobs(**filters, limit=page_size, cursor=cursor)
            for job in page.jobs:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def resolve(self, job_id: str) -> str:
        """The full id of the one job whose id starts with `job_id` (as git and docker take
        short ids). A full id is returned as it is, unasked; an ambiguous prefix raises
        `AmbiguousJobId` with the candidates, an unknown one `JobNotFound`."""
        ref = job_id.strip().lower()
        if JOB_ID.fullmatch(ref):
            return ref
        if not ID_PREFIX.fullmatch(ref):
            raise JobNotFound(
                f"{job_id!r} is not a job id or the start of one (hex digits and dashes)", path="$.job_id"
            )
        page = await self.jobs(id_prefix=ref, limit=_CANDIDATES + 1)
        if not page.jobs:
            raise JobNotFound(f"no job id starts with {ref}", path="$.job_id")
        if len(page.jobs) > 1:
            raise AmbiguousJobId(ref, page.jobs[:_CANDIDATES], more=len(page.jobs) > _CANDIDATES)
        return page.jobs[0].job_id

    # --- events ------------------------------------------------------------------------

    @property
    def reads(self) -> Reads:
        """Reads of stored events and results, through the gateway, within this client's team."""
        return Reads(self._ask, self.topology.results_bucket)

    async def events(self, job_id: str = "*", kind: str = "*", *, history: bool = False) -> AsyncIterator[Event]:
        """Every event matching the filter, as it is stored (from the start when `history`).

        The stored events are read through the gateway (its `read` endpoint), which keeps a
        submitter to its own team's; a core subscription to the same subjects (which
        nats-server gives a team for its own jobs only) says when to read again. Events come
        in the stream's order, each once, none missed between the history and the live ones.

        A filter, not a lookup: with `*`, an id no job has yet matches nothing, so this waits;
        a job id is asked of the gateway, and one the requester may not see raises `JobNotFound`.
        """
        subject = self.topology.events_filter(job_id, kind)
        bell = Doorbell(patience=self.timeout)
        with self._errors(f"the events on {subject}"):
            sub = await self.nc.subscribe(subject, cb=bell.ring)
        try:
            with self._errors(f"the events on {subject}"):
                # The server has the subscription before the stream is read, so an event
                # stored after the read below rings.
                # Shielded: a flush cancelled before its reply arrives leaves the client's
                # read loop stopped for good, and the whole connection with it.
                await asyncio.shield(self.nc.flush(math.ceil(self.timeout)))
            reads = self.reads
            seq = 0 if history else await reads.last_seq()
            while True:
                bell.clear()
                more = True
                while more:
                    page = await reads.events(job_id=job_id, kind=kind, after=seq)
                    more = page.more
                    for stored in page.events:
                        seq = stored.seq
                        data = bytes(stored.event)
                        bell.stored(data)
                        yield decode_event(data)
                await bell.wait(self.nc)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def watch(self, job_id: str) -> AsyncIterator[Event]:
        """The job's events from `queued` on, ending after its terminal event.

        `events` with its history: a watcher that starts late still sees the whole history,
        so there is no race between submit and watch. An unknown id raises
        `JobNotFound` first instead of waiting for events that never come.
        """
        await self.get_job(job_id)
        async for event in self.events(job_id, history=True):
            yield event
            if isinstance(event, (Completed, Failed, Cancelled)):
                return

    async def wait_for_job(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """Wait for the job's end; returns its JobInfo, or raises JobFailed / JobCancelled / Timeout.

        One status request (a 404 for an unknown id, before any waiting); then the job's events
        until its terminal one, read through the gateway as they come, and its record asked
        once more, terminal by then (a record is written before its event).
        """
        try:
            async with asyncio.timeout(timeout):
                info = await self.get_job(job_id)
                if info.status not in TERMINAL:
                    stored = self.events(job_id, history=True)
                    try:
                        async for event in stored:
                            if isinstance(event, (Completed, Failed, Cancelled)):
                                break
                    finally:
                        await stored.aclose()  # type: ignore[attr-defined]
                    # Terminal by now: a record is written before its event.
                    info = await self.get_job(job_id)
        except TimeoutError as exc:
            if isinstance(exc, EvalqError):
                raise
            raise Timeout(f"job {job_id} did not end within {timeout}s; it goes on: wait again, or cancel it") from None
        if info.status == "failed":
            raise JobFailed(job_id, info.error or "failed", info)
        if info.status == "cancelled":
            raise JobCancelled(job_id, info.error or "cancelled", info)
        return info

    async def submit_and_wait(
        self, timeout: float | None = None, *, job_timeout: int | None = None, **fields: Any
    ) -> JobInfo:
        """Submit, then wait up to `timeout` s for the end; `job_timeout` is the job's own
        time limit (the request's `timeout` field)."""
        if job_timeout is not None:
            fields["timeout"] = job_timeout
        accepted = await self.submit(**fields)
        return await self.wait_for_job(accepted.job_id, timeout=timeout)

    async def rescore(
        self,
        job_id: str,
        *,
        tasks: list[str] | None = None,
        labels: dict[str, str] | None = None,
        pool: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobAccepted:
        """Score a completed job's recorded responses again, with the workers' task code as it is
        now; no model is loaded. Returns the new job's JobAccepted.

        The new request is the source's (model, model_args, limit, num_fewshot, gen_kwargs,
        log_samples, predict_only, batch_size, device, output_dir, seed, labels, pool) with
        `shards=1` and `rescore_of` the source's id; `tasks` picks some of the source's tasks,
        `labels` and `pool` replace its own, and `fields` set any other request field. `job_id`
        may be any unique start of the id. A task the source did not run raises InvalidField
        before anything is sent; a source that has not completed is refused by the gateway (409).
        """
        source = await self.get_job(await self.resolve(job_id))
        body = _rescore_body(source, tasks=tasks, labels=labels, pool=pool, fields=fields)
        return await self.submit(body, idempotency_key=idempotency_key)

    # --- results -------------------------------------------------------------------------

    async def results(self, job_id: str, dest_dir: str | Path = ".") -> list[Path]:
        """Download the job's artifacts into `dest_dir/<job_id>/`; returns the files written.

        The artifacts are those the job's record names, plus `results.json` and `eval.log`
        (a failed job has its log only), read through the gateway chunk by chunk, each checked
        whole. A job with none yet gives an empty list; an unknown id, or another team's job,
        raises `JobNotFound` before anything is read.
        """
        root = (Path(dest_dir) / job_id).resolve()
        written: list[Path] = []
        # A 404 for an unknown id, or another team's job, before anything is read.
        info = await self.get_job(job_id)
        names = [f"{job_id}/results.json", f"{job_id}/eval.log"]
        if info.result is not None:
            names = [*info.result.artifacts, *(name for name in names if name not in info.result.artifacts)]
        reads = self.reads
        for name in names:
            relative = PurePosixPath(name[len(job_id) + 1 :])
            outside = relative.is_absolute() or ".." in relative.parts or not relative.parts
            if not name.startswith(f"{job_id}/") or outside:
                continue  # never write outside dest_dir, whatever the store or the record holds
            data = await reads.read_object(name)
            if data is None:
                continue
            target = root.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written.append(target)
        return sorted(written)

    async def artifact(self, job_id: str, name: str) -> Artifact | None:
        """Open one artifact of the job to stream it; None when the store has no such object.

        `name` is relative to the job's folder (`results.json`, `samples/x.jsonl`); one that
        would leave it (absolute, or with `..`) is refused as absent. A job the requester may
        not see raises `JobNotFound` (for a team, an id with no record is such a job; the
        queue's own account reads what is stored under any id).
        """
        relative = PurePosixPath(name)
        if relative.is_absolute() or not relative.parts or ".." in relative.parts or name != str(relative):
            return None
        full = f"{job_id}/{relative}"
        info = await self.reads.object_info(full)
        return None if info is None else Artifact(self, full, info)


# What a re-score keeps of its source's request: what decides which documents were asked and
# how, so that the new scores are of the same responses. Nothing about running a model
# (num_gpus, fresh_model, cache, timeout) is kept: a re-score runs none.
_RESCORE_KEEPS = (
    "model model_args limit num_fewshot gen_kwargs log_samples predict_only batch_size device output_dir seed"
)


def _rescore_body(
    source: JobInfo,
    *,
    tasks: list[str] | None,
    labels: dict[str, str] | None,
    pool: str | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """The request that re-scores `source`; refuses, before anything is sent, what cannot work."""
    if "rescore_of" in fields:
        raise TypeError("rescore() names the source itself: pass its id as job_id, not rescore_of")
    request = source.request
    if request is None:
        raise InvalidField(
            f"job {source.job_id}'s record holds no request (it was read without one), so there is nothing "
            "to build a re-score from",
            path="$.rescore_of",
        )
    chosen = list(request.tasks) if tasks is None else list(tasks)
    for index, task in enumerate(chosen):
        if task not in request.tasks:
            raise InvalidField(
                f"task {task!r} is not among the tasks job {source.job_id} ran ({', '.join(request.tasks)}); "
                "a re-score scores only responses that were recorded",
                path=f"$.tasks[{index}]",
            )
    kept = {name: getattr(request, name) for name in _RESCORE_KEEPS.split()}
    body: dict[str, Any] = {name: value for name, value in kept.items() if value is not None}
    body.update(tasks=chosen, labels=source.labels if labels is None else labels, pool=pool or source.pool, shards=1)
    # The caller's fields go over the copy (a shards > 1 among them is the gateway's to refuse).
    body.update(fields)
    body["rescore_of"] = source.job_id
    return body


class Artifact:
    """One artifact of a job, opened: its name and size, and its bytes as they are read (`chunks()`)."""

    def __init__(self, client: AsyncClient, name: str, info: ObjectInfo) -> None:
        self.name = name
        self.size = info.size or 0
        self._client = client
        self._info = info

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._client.reads.chunks(self.name, self._info):
            yield chunk
