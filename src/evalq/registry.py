"""The worker registry: the live workers as the `<prefix>-workers` bucket holds them, and what
each can run.

Workers write their entries (`worker/registration.py`); everything that reads them is here.
The gateway follows the bucket with a watch, as the job history follows the jobs bucket,
so a slow server delays a change but never empties the view: there is no listing to time
out. Each entry lives for its own TTL from its last write (three of its worker's
heartbeats), the rule the server applies to the entry itself, and leaves the view at once
when its worker deletes it on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.js.kv import KeyValue

from .errors import InvalidField, Unavailable
from .follow import Follower
from .schemas import EvaluateRequest, WorkerInfo, decode

__all__ = ["Registry", "cannot_run", "check", "is_ready"]

log = logging.getLogger("evalq.registry")

# An entry from a worker that predates `WorkerInfo.ttl` is kept this long after its last
# write: longer than any such worker's three heartbeats, so a live one is never dropped.
_TTL_UNSTATED = 60.0


def is_ready(worker: WorkerInfo) -> bool:
    """Whether the worker has listed what it can run; until then it says nothing about it."""
    return worker.tasks is not None


def cannot_run(worker: WorkerInfo, request: EvaluateRequest) -> str | None:
    """Why `worker` cannot run `request`, or None. A worker that has not listed what it can
    run (no inventory) is taken at its word: None."""
    if worker.tasks is None:
        return None
    if worker.models and request.model not in worker.models:
        return f"it does not have the model {request.model!r}"
    missing = [task for task in request.tasks if task not in worker.tasks]
    if missing:
        return f"it does not know the task{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    # A CPU-only worker (0 GPUs) still runs single-process jobs.
    if request.num_gpus > max(worker.gpu_count, 1):
        return f"num_gpus={request.num_gpus} but it has {max(worker.gpu_count, 1)}"
    return None


def check(ready: list[WorkerInfo], request: EvaluateRequest) -> None:
    """Refuse what none of the `ready` workers of the request's pool can run, naming the field;
    accept anything while none of them has said what it can run."""
    known = [w for w in ready if is_ready(w) and w.pool == request.pool]
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


class _View:
    """Entries by worker id, each with the monotonic time it expires at."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[WorkerInfo, float]] = {}

    def apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.entries.pop(entry.key, None)
            return
        try:
            worker = decode(entry.value, WorkerInfo)
        except ValueError:
            log.warning("ignoring an unreadable worker entry %s", entry.key)
            return
        ttl = worker.ttl or _TTL_UNSTATED
        # The server's clock dates the write; an entry read at load time may be most of its
        # TTL old already. Bounded, so a skewed clock can neither keep it nor drop it at once.
        created = entry.created
        age = (datetime.now(UTC) - created).total_seconds() if isinstance(created, datetime) else 0.0
        self.entries[entry.key] = (worker, time.monotonic() + ttl - min(max(age, 0.0), ttl))

    def live(self) -> list[WorkerInfo]:
        now = time.monotonic()
        return sorted((w for w, expires in self.entries.values() if expires > now), key=lambda w: w.worker_id)


class Registry(Follower):
    """The live workers, loaded from the workers bucket and then followed by a watch.

    Until the bucket is loaded the answers wait for it, then raise `Unavailable` rather than
    say "no workers".
    """

    what = "worker registry"

    def __init__(self, kv: KeyValue, *, nc: Client | None = None, retry: float = 1.0) -> None:
        super().__init__(kv, nc=nc, retry=retry)
        self._view = _View()
        # Set on every change the watch brings, for the dispatcher to wake on.
        self.changed = asyncio.Event()

    @classmethod
    async def read(cls, kv: KeyValue) -> list[WorkerInfo]:
        """The live workers now, from one pass over the bucket (for a process that does not follow it)."""
        view = _View()
        async for entry in cls(kv).entries():
            if entry is None:
                break
            view.apply(entry)
        return view.live()

    async def follow(self) -> None:
        view = _View()
        async for entry in self.entries():
            if entry is None:  # every stored entry has been read: the view is whole
                self._view = view
                self.loaded.set()
            else:
                view.apply(entry)
                self.changed.set()

    def live(self) -> list[WorkerInfo]:
        """The live workers as the view holds them now, without waiting for a load."""
        return self._view.live()

    async def workers(self, *, wait: float = 5.0) -> list[WorkerInfo]:
        """Every live worker, ready or not, by worker id."""
        if not self.loaded.is_set():
            try:
                await asyncio.wait_for(asyncio.shield(self.loaded.wait()), wait)
            except TimeoutError:
                raise Unavailable("this gateway is still reading the worker registry; retry in a moment") from None
        return self._view.live()

    async def ready(self, pool: str | None = None) -> list[WorkerInfo]:
        """The live workers (of `pool`, or of every pool) that have listed what they can run."""
        return [w for w in await self.workers() if is_ready(w) and (pool is None or w.pool == pool)]

    async def check(self, request: EvaluateRequest) -> None:
        """Refuse what no live worker of the request's pool can run (see `check`); before the
        registry is loaded nothing is known, and everything is accepted, as the worker checks again."""
        if self.loaded.is_set():
            check(await self.ready(request.pool), request)

    async def tasks(self) -> list[str]:
        """Every task some ready worker lists."""
        return sorted(set().union(*(w.tasks or [] for w in await self.ready())))

    async def models(self) -> list[str]:
        """Every model some ready worker lists."""
        return sorted(set().union(*(w.models or [] for w in await self.ready())))
