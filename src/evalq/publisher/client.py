"""`AsyncClient`: submit jobs, follow their events, fetch results. Never polls.

Method names follow lmms-eval's `EvalClient` (`evaluate`, `get_job`, `cancel_job`,
`wait_for_job`, `health`, `is_healthy`, `list_tasks`, `list_models`), so switching is a
change of import; every return value is a typed Struct.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from ..config import Settings, load_settings
from ..connection import connect
from ..errors import EvalqError, JobCancelled, JobFailed, RequestError, Unavailable
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

_SERVICE_CODE = "Nats-Service-Error-Code"


class _ErrorBody(msgspec.Struct):
    code: int = 500
    message: str = ""
    path: str | None = None


class _ErrorReply(msgspec.Struct):
    error: _ErrorBody


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
        self.timeout = timeout or self.settings.request_timeout
        self._nc = nc
        self._owns_connection = nc is None

    # --- lifecycle -------------------------------------------------------------------

    async def connect(self) -> AsyncClient:
        if self._nc is None:
            self._nc = await connect(self.settings, name="evalq-client")
        return self

    async def close(self) -> None:
        if self._nc is not None and self._owns_connection:
            await self._nc.drain()
        self._nc = None

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise EvalqError("the client is not connected; use `async with AsyncClient() as client:`")
        return self._nc

    # --- requests ----------------------------------------------------------------------

    async def _request(self, endpoint: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
        subject = self.topology.subject(endpoint)
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
                    raise Unavailable(f"no gateway answers on {subject}; is `evalq gateway` running?") from None
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
                return decode(await self._request("submit", body, headers), JobAccepted)
            except (TimeoutError, NatsTimeout, Unavailable):
                if attempt == retries:
                    raise
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))  # back-off before the same-key retry
        raise AssertionError("unreachable")

    async def evaluate(self, model: str, tasks: list[str], **fields: Any) -> JobAccepted:
        """lmms-eval's `EvalClient.evaluate`: same arguments, returns the JobAccepted."""
        return await self.submit(model=model, tasks=tasks, **fields)

    async def get_job(self, job_id: str) -> JobInfo:
        return decode(await self._request("status", encode({"job_id": job_id})), JobInfo)

    async def cancel_job(self, job_id: str) -> CancelReply:
        return decode(await self._request("cancel", encode({"job_id": job_id})), CancelReply)

    async def queue(self) -> QueueStatus:
        return decode(await self._request("queue", b"{}"), QueueStatus)

    get_queue_status = queue

    async def health(self) -> Health:
        return decode(await self._request("health"), Health)

    async def is_healthy(self) -> bool:
        try:
            return (await self.health()).status == "healthy"
        except (TimeoutError, EvalqError, NatsTimeout):
            return False

    async def list_tasks(self) -> list[str]:
        return decode(await self._request("tasks"), TasksReply).tasks

    async def list_models(self) -> list[str]:
        return decode(await self._request("models"), ModelsReply).models

    # --- events ------------------------------------------------------------------------

    async def events(self, job_id: str = "*", kind: str = "*", *, history: bool = False) -> AsyncIterator[Event]:
        """Every event matching the filter, as it happens (from the start when `history`)."""
        js = self.nc.jetstream()
        sub = await js.subscribe(
            self.topology.events_filter(job_id, kind),
            stream=self.topology.events_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL if history else DeliverPolicy.NEW,
        )
        try:
            async for msg in sub.messages:
                yield decode_event(msg.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def watch(self, job_id: str) -> AsyncIterator[Event]:
        """The job's events from `queued` on, ending after its terminal event.

        An ordered consumer that delivers all: a watcher that starts late still sees the
        whole history, so there is no race between submit and watch.
        """
        async for event in self.events(job_id, history=True):
            yield event
            if isinstance(event, (Completed, Failed, Cancelled)):
                return

    async def wait_for_job(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """Wait for the job's end; returns its JobInfo, or raises JobFailed / JobCancelled / TimeoutError."""
        async with asyncio.timeout(timeout):
            info = await self.get_job(job_id)  # 404 for an unknown id, before any waiting
            if info.status not in TERMINAL:
                async for _ in self.watch(job_id):
                    pass
                info = await self.get_job(job_id)
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
        """Download the job's artifacts into `dest_dir/<job_id>/`; returns the files written."""
        store = await self.nc.jetstream().object_store(self.topology.results_bucket)
        root = (Path(dest_dir) / job_id).resolve()
        written: list[Path] = []
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
        return sorted(written)
