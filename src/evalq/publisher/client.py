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
from nats.js.api import DeliverPolicy
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ..config import Settings, load_settings
from ..connection import HINT, connect
from ..errors import ConnectError, EvalqError, JobCancelled, JobFailed, RequestError, Timeout, Unavailable
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
    ModelsReply,
    QueueStatus,
    TasksReply,
    decode,
    decode_event,
    encode,
)
from ..topology import Topology

__all__ = ["AsyncClient"]

T = TypeVar("T")
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

    # --- events ------------------------------------------------------------------------

    async def events(self, job_id: str = "*", kind: str = "*", *, history: bool = False) -> AsyncIterator[Event]:
        """Every event matching the filter, as it happens (from the start when `history`).

        A filter, not a lookup: an id no job has matches nothing, so this waits rather than
        raising `JobNotFound` (`watch` asks first).
        """
        what = f"the events stream {self.topology.events_stream}"
        with self._errors(what):
            js = self.nc.jetstream(domain=self.settings.connection.js_domain, timeout=self.timeout)
            sub = await js.subscribe(
                self.topology.events_filter(job_id, kind),
                stream=self.topology.events_stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL if history else DeliverPolicy.NEW,
            )
        try:
            with self._errors(what):
                async for msg in sub.messages:
                    yield decode_event(msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def watch(self, job_id: str) -> AsyncIterator[Event]:
        """The job's events from `queued` on, ending after its terminal event.

        An ordered consumer that delivers all: a watcher that starts late still sees the
        whole history, so there is no race between submit and watch. An unknown id raises
        `JobNotFound` first instead of waiting for events that never come.
        """
        await self.get_job(job_id)
        async for event in self.events(job_id, history=True):
            yield event
            if isinstance(event, (Completed, Failed, Cancelled)):
                return

    async def wait_for_job(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """Wait for the job's end; returns its JobInfo, or raises JobFailed / JobCancelled / Timeout."""
        try:
            async with asyncio.timeout(timeout):
                info = await self.get_job(job_id)  # 404 for an unknown id, before any waiting
                if info.status not in TERMINAL:
                    async for _ in self.watch(job_id):
                        pass
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

    async def submit_and_wait(self, timeout: float | None = None, **fields: Any) -> JobInfo:
        accepted = await self.submit(**fields)
        return await self.wait_for_job(accepted.job_id, timeout=timeout)

    # --- results -------------------------------------------------------------------------

    async def results(self, job_id: str, dest_dir: str | Path = ".") -> list[Path]:
        """Download the job's artifacts into `dest_dir/<job_id>/`; returns the files written.

        A job with none yet gives an empty list; an unknown id (asked of the gateway when no
        file is found) raises `JobNotFound`.
        """
        bucket = self.topology.results_bucket
        root = (Path(dest_dir) / job_id).resolve()
        written: list[Path] = []
        with self._errors(f"the results bucket {bucket}"):
            js = self.nc.jetstream(domain=self.settings.connection.js_domain, timeout=self.timeout)
            store = await js.object_store(bucket)
            try:
                infos = await store.list()
            except NotFoundError:  # what nats-py raises for an empty store
                infos = []
            for info in infos:
                name = info.name or ""
                if not name.startswith(f"{job_id}/") or info.deleted:
                    continue
                relative = PurePosixPath(name[len(job_id) + 1 :])
                if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                    continue  # never write outside dest_dir, whatever the store holds
                target = root.joinpath(*relative.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                result = await store.get(name)
                target.write_bytes(result.data or b"")
                written.append(target)
        if not written:
            await self.get_job(job_id)
        return sorted(written)
