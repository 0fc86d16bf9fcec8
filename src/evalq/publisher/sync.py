"""`Client`: the blocking face of AsyncClient, for scripts and training loops.

It runs its own event loop on a private thread, so it works the same whether or not the
caller is already inside a running asyncio loop (a notebook, say). It raises what
AsyncClient raises: `EvalqError`s only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import queue
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..config import Settings
from ..errors import ConnectError
from ..schemas import (
    CancelReply,
    EvaluateRequest,
    Event,
    Health,
    JobAccepted,
    JobInfo,
    JobsPage,
    JobSummary,
    QueueStatus,
    TeamsReply,
)
from .client import AsyncClient

__all__ = ["Client"]

T = TypeVar("T")
_DONE = object()


class Client:
    """`with Client() as client: client.submit(model="dummy", tasks=["evalq_demo"])`."""

    def __init__(self, settings: Settings | None = None, *, timeout: float | None = None, **overrides: Any) -> None:
        self._async = AsyncClient(settings, timeout=timeout, **overrides)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="evalq-client", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._run(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectError("this Client is closed: make a new one (`with Client() as client:`)")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            self._check_open()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._closed = True

    def close(self) -> None:
        if not self._closed:
            try:
                self._run(self._async.close())
            finally:
                self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the same methods as AsyncClient, blocking -------------------------------------------

    def submit(
        self,
        request: EvaluateRequest | dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        retries: int = 3,
        **fields: Any,
    ) -> JobAccepted:
        return self._run(self._async.submit(request, idempotency_key=idempotency_key, retries=retries, **fields))

    def evaluate(self, model: str, tasks: list[str], **fields: Any) -> JobAccepted:
        return self._run(self._async.evaluate(model, tasks, **fields))

    def get_job(self, job_id: str) -> JobInfo:
        return self._run(self._async.get_job(job_id))

    def cancel_job(self, job_id: str) -> CancelReply:
        return self._run(self._async.cancel_job(job_id))

    def queue(self) -> QueueStatus:
        return self._run(self._async.queue())

    get_queue_status = queue

    def health(self) -> Health:
        return self._run(self._async.health())

    def is_healthy(self) -> bool:
        return self._run(self._async.is_healthy())

    def list_tasks(self) -> list[str]:
        return self._run(self._async.list_tasks())

    def list_models(self) -> list[str]:
        return self._run(self._async.list_models())

    def teams(self) -> TeamsReply:
        return self._run(self._async.teams())

    def jobs(
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
        return self._run(
            self._async.jobs(
                status=status,
                pool=pool,
                labels=labels,
                created_after=created_after,
                created_before=created_before,
                id_prefix=id_prefix,
                metrics=metrics,
                limit=limit,
                cursor=cursor,
                team=team,
            )
        )

    def iter_jobs(self, *, page_size: int = 1000, **filters: Any) -> Iterator[JobSummary]:
        return self._iterate(self._async.iter_jobs(page_size=page_size, **filters))

    def resolve(self, job_id: str) -> str:
        return self._run(self._async.resolve(job_id))

    def wait_for_job(self, job_id: str, timeout: float | None = None) -> JobInfo:
        return self._run(self._async.wait_for_job(job_id, timeout=timeout))

    def submit_and_wait(
        self, timeout: float | None = None, *, job_timeout: int | None = None, **fields: Any
    ) -> JobInfo:
        return self._run(self._async.submit_and_wait(timeout=timeout, job_timeout=job_timeout, **fields))

    def rescore(
        self,
        job_id: str,
        *,
        tasks: list[str] | None = None,
        labels: dict[str, str] | None = None,
        pool: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobAccepted:
        return self._run(
            self._async.rescore(
                job_id, tasks=tasks, labels=labels, pool=pool, idempotency_key=idempotency_key, **fields
            )
        )

    def results(self, job_id: str, dest_dir: str | Path = ".") -> list[Path]:
        return self._run(self._async.results(job_id, dest_dir))

    def watch(self, job_id: str) -> Iterator[Event]:
        return self._iterate(self._async.watch(job_id))

    def events(self, job_id: str = "*", kind: str = "*", *, history: bool = False) -> Iterator[Event]:
        return self._iterate(self._async.events(job_id, kind, history=history))

    def _iterate(self, source: Any) -> Iterator[Any]:
        self._check_open()
        items: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in source:
                    items.put(item)
            except BaseException as exc:  # handed to the caller's thread
                items.put(exc)
            finally:
                items.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while True:
                item = items.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        return
                    raise item
                yield item
        finally:
            future.cancel()
