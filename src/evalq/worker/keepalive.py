"""The message in hand, renewed (`in_progress`) every quarter of the ack_wait in force.

The ack_wait in force is the consumer's as the server has it, read when a message is taken
and again at every renewal, so a change made by any means is followed at the next renewal;
or a lower one that `evalq setup` announces on the pool's `ack_wait_subject`, which takes
effect at once: the message is renewed, the pace switched, and only then is the
announcement answered, so setup applies the lower value only to workers already keeping up
with it (see `renewal.py`). A worker that misses the announcement still finds the value
in the consumer's `LOWERING` mark the next time it reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from ..schemas import Announcement, Confirmation, decode
from ..topology import Topology

__all__ = ["KeepAlive"]

log = logging.getLogger("evalq.worker")


class KeepAlive:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        topology: Topology,
        *,
        pool: str,
        worker_id: str,
        ack_wait: float,
        timeout: float,
        current_job: Callable[[], str | None],
    ) -> None:
        self.nc = nc
        self.js = js
        self.topology = topology
        self.pool = pool
        self.worker_id = worker_id
        self.ack_wait = ack_wait
        self.timeout = timeout
        self.current_job = current_job
        self._held: Msg | None = None
        self._renewed_at = 0.0
        # Set when an announcement renewed the message and changed the pace: the renewal
        # loop starts its wait again from there.
        self._retimed = asyncio.Event()
        # Counts announcements, so that a read of the consumer begun before one (and answered
        # with the old value) does not undo it.
        self._announced = 0
        self._sub: Subscription | None = None

    @property
    def period(self) -> float:
        # Four times per ack_wait: a missed beat or two still does not get it redelivered.
        return max(0.5, self.ack_wait / 4)

    async def start(self) -> float:
        """Read the consumer's ack_wait and listen for announcements; returns the ack_wait.
        Called before the worker's first fetch, so no message is taken unannounced."""
        self.ack_wait = await self.topology.ack_wait_of(self.js, self.pool)
        self._sub = await self.nc.subscribe(self.topology.ack_wait_subject(self.pool), cb=self._on_announcement)
        return self.ack_wait

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    @contextlib.asynccontextmanager
    async def holding(self, msg: Msg) -> AsyncIterator[None]:
        """Keep `msg` alive for the duration of the block (until it is settled, uploads and all)."""
        self._held = msg
        self._renewed_at = asyncio.get_running_loop().time()  # as good as renewed: just delivered
        renewing = asyncio.create_task(self._renew_until_settled(msg))
        try:
            yield
        finally:
            self._held = None
            renewing.cancel()
            await asyncio.wait([renewing], timeout=10)

    async def _renew_until_settled(self, msg: Msg) -> None:
        loop = asyncio.get_running_loop()
        await self._refresh()
        while self._held is msg:
            self._retimed.clear()
            due = self._renewed_at + self.period
            if loop.time() < due:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retimed.wait(), due - loop.time())
                continue  # due again: an announcement may have renewed it or changed the pace
            await self._renew(msg)
            await self._refresh()

    async def _renew(self, msg: Msg) -> None:
        self._renewed_at = asyncio.get_running_loop().time()
        try:
            await msg.in_progress()
        except Exception as exc:
            log.warning("in_progress failed: %s", exc)

    async def _refresh(self) -> None:
        """Read the ack_wait in force again; a read that fails keeps the last one."""
        announced = self._announced
        try:
            found = await asyncio.wait_for(
                self.topology.ack_wait_of(self.js, self.pool), min(self.timeout, self.period)
            )
        except Exception as exc:
            log.debug("could not read the consumer's ack_wait: %s", exc)
            return
        if announced == self._announced and found != self.ack_wait:
            log.info("pool %s: ack_wait is now %g s; renewing every %g s", self.pool, found, max(0.5, found / 4))
            self.ack_wait = found

    async def _on_announcement(self, msg: Msg) -> None:
        try:
            change = decode(msg.data, Announcement)
        except ValueError as exc:
            log.warning("an unreadable ack_wait announcement: %s", exc)
            return
        if change.pool != self.pool:
            return
        self._announced += 1
        if change.ack_wait < self.ack_wait:
            log.info(
                "pool %s: ack_wait lowered to %g s; renewing every %g s",
                self.pool,
                change.ack_wait,
                max(0.5, change.ack_wait / 4),
            )
            self.ack_wait = change.ack_wait
        held = self._held
        if held is not None:
            await self._renew(held)
            self._retimed.set()
        answer = Confirmation(
            worker_id=self.worker_id, ack_wait=self.ack_wait, holding=held is not None, job_id=self.current_job()
        )
        if msg.reply:
            try:
                await msg.respond(msgspec.json.encode(answer))
            except Exception as exc:
                log.warning("could not confirm the ack_wait announcement: %s", exc)
