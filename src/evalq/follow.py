"""Following a key-value bucket: load its last values with a watch, then apply each change.

The gateway keeps two views this way, the job history (the jobs bucket) and the worker
registry (the workers bucket): answers come from memory, with no listing that a slow server
could time out. A watch that stops is started again after `retry` seconds, loading the
bucket afresh while the last view keeps answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Self

from nats.js.kv import KeyValue

__all__ = ["Follower"]

log = logging.getLogger("evalq.gateway")


class Follower:
    """A background task that follows `kv`; subclasses say what to do with its entries in `follow()`.

    `loaded` is set once the first load is done; `start()` waits for it up to `wait` seconds.
    """

    what = "a bucket"

    def __init__(self, kv: KeyValue, *, retry: float = 1.0) -> None:
        self.kv = kv
        self.retry = retry
        self.loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, wait: float = 1.0) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"evalq-follow {self.what}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.loaded.wait()), wait)
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def follow(self) -> None:
        """Load the bucket with `entries()` and follow it; return or raise to be started again."""
        raise NotImplementedError

    async def entries(self) -> AsyncIterator[KeyValue.Entry | None]:
        """The bucket's last values, then None once they are all read, then each change."""
        watcher = await self.kv.watchall()
        try:
            async for entry in watcher:
                yield entry
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _run(self) -> None:
        while True:
            try:
                await self.follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: the watch of the bucket stopped (%s); reloading", self.what, exc)
            await asyncio.sleep(self.retry)
