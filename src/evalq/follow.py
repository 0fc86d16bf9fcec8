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

from nats.aio.client import Client
from nats.js.kv import KeyValue

__all__ = ["Follower"]

log = logging.getLogger("evalq.gateway")


class Follower:
    """A background task that follows `kv`; subclasses say what to do with its entries in `follow()`.

    `loaded` is set once the first load is done; `start()` waits for it up to `wait` seconds.
    """

    what = "a bucket"

    def __init__(self, kv: KeyValue, *, nc: Client | None = None, retry: float = 1.0) -> None:
        self.kv = kv
        # The connection whose reconnects restart the watch (none: only a failed watch does).
        self.nc = nc
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
            reconnects = self._reconnects()
            following = asyncio.create_task(self.follow())
            try:
                while not following.done() and self._reconnects() == reconnects:
                    await asyncio.wait([following], timeout=_RECONNECT_CHECK)
                if following.done():
                    following.result()  # what stopped the watch
                else:
                    # The server may have restarted, and the consumer behind the watch with it:
                    # the watch would sit silent until the client noticed. Load afresh now.
                    log.info("%s: reconnected to NATS; loading the bucket again", self.what)
            except Exception as exc:
                log.warning("%s: the watch of the bucket stopped (%s); reloading", self.what, exc)
            finally:
                if not following.done():
                    following.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await following
            await asyncio.sleep(self.retry)

    def _reconnects(self) -> int:
        return int(self.nc.stats["reconnects"]) if self.nc is not None else 0


_RECONNECT_CHECK = 1.0
