"""The live workers, as advertised in the `<prefix>-workers` bucket, and checks against them."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js.errors import NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from ..errors import InvalidField
from ..schemas import EvaluateRequest, WorkerInfo, decode

__all__ = ["WorkerDirectory", "is_ready"]

log = logging.getLogger("evalq.gateway")


def is_ready(worker: WorkerInfo) -> bool:
    """Whether the worker has listed what it can run; until then it says nothing about it."""
    return worker.tasks is not None


class WorkerDirectory:
    """A view of the workers bucket, refreshed at most every `max_age` seconds."""

    def __init__(self, kv: KeyValue, max_age: float = 2.0) -> None:
        self.kv = kv
        self.max_age = max_age
        self._workers: list[WorkerInfo] = []
        self._read_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def workers(self, *, fresh: bool = False) -> list[WorkerInfo]:
        if fresh or time.monotonic() - self._read_at > self.max_age:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh())
            await asyncio.shield(self._refreshing)
        return self._workers

    async def _refresh(self) -> None:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            keys = []
        entries = await asyncio.gather(*(self.kv.get(key) for key in keys), return_exceptions=True)
        workers = []
        for entry in entries:
            if isinstance(entry, NotFoundError):
                continue  # expired between listing and reading
            if isinstance(entry, BaseException):
                raise entry
            if entry.value:
                try:
                    workers.append(decode(entry.value, WorkerInfo))
                except ValueError:
                    log.warning("ignoring an unreadable worker entry %s", entry.key)
        self._workers = sorted(workers, key=lambda w: w.worker_id)
        self._read_at = time.monotonic()

    async def ready_workers(self, pool: str | None = None) -> list[WorkerInfo]:
        """The ready workers (of `pool`, or of every pool), from the cached view."""
        return [w for w in await self.workers() if is_ready(w) and (pool is None or w.pool == pool)]

    async def check(self, request: EvaluateRequest) -> None:
        """Refuse what no live worker of the pool can run; accept anything while none has said."""
        # The cached view is enough: a worker missing from it only makes this more lenient.
        known = await self.ready_workers(request.pool)
        if not known:
            return
        models = set().union(*(w.models or [] for w in known))
        if models and request.model not in models:
            raise InvalidField(
                f"unknown model {request.model!r}: the workers of pool {request.pool!r} offer "
                f"{len(models)} models (see `evalq models`)",
                path="$.model",
            )
        tasks = set().union(*(w.tasks or [] for w in known))
        for index, task in enumerate(request.tasks):
            if task not in tasks:
                raise InvalidField(
                    f"unknown task {task!r}: no live worker of pool {request.pool!r} lists it (see `evalq tasks`)",
                    path=f"$.tasks[{index}]",
                )
        # A CPU-only worker (0 GPUs) still runs single-process jobs.
        most = max(max(w.gpu_count, 1) for w in known)
        if request.num_gpus > most:
            raise InvalidField(
                f"num_gpus={request.num_gpus} but the largest live worker of pool {request.pool!r} has {most}",
                path="$.num_gpus",
            )

    async def tasks(self) -> list[str]:
        """Every task some ready worker lists."""
        return sorted(set().union(*(w.tasks or [] for w in await self._answering())))

    async def models(self) -> list[str]:
        """Every model some ready worker lists."""
        return sorted(set().union(*(w.models or [] for w in await self._answering())))

    async def _answering(self) -> list[WorkerInfo]:
        ready = await self.ready_workers()
        if not ready:
            # The cached view may predate the first worker's inventory: an empty answer
            # is only given after reading the bucket afresh.
            await self.workers(fresh=True)
            ready = await self.ready_workers()
        return ready
