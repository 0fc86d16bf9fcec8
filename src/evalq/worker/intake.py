"""What a worker takes next: an admitted job before a piece, fetched as soon as one lands.

A worker pulls from two durable consumers of its pool, the jobs the dispatcher admitted and
the pieces of started sharded jobs. A pull request waits on one consumer only, and a message
it delivers after its waiter gave up is taken with nobody to run it, so an idle worker parks
no long fetch on either. It listens instead (core NATS) to the subjects both streams capture:
a publish there wakes it, and it fetches from that consumer at once. Every `poll` seconds it
fetches from both anyway, for the messages that come back without a publish (a nak's delay,
an ack_wait that ran out) and for a server whose permissions deny the listening.

Jobs come first: a job is admitted for an idle worker, or for a worker running a lower
sharded job's pieces (docs/DESIGN.md, "Scheduling"), which takes it after its piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext

__all__ = ["Intake"]

log = logging.getLogger("evalq.worker")


class Intake:
    """`await intake.start()`, then `msgs, is_piece = await intake.next(stopping)` in the pull loop."""

    def __init__(
        self,
        nc: Client,
        jobs: JetStreamContext.PullSubscription,
        pieces: JetStreamContext.PullSubscription,
        *,
        jobs_subjects: str,
        pieces_subjects: str,
        poll: float = 1.0,
        fetch_timeout: float = 0.1,
    ) -> None:
        self.nc = nc
        self.jobs = jobs
        self.pieces = pieces
        self.jobs_subjects = jobs_subjects
        self.pieces_subjects = pieces_subjects
        self.poll = poll
        self.fetch_timeout = fetch_timeout
        # Set by a publish seen on a stream's subjects, or by a fetch that took a message
        # (the stream may hold more): that consumer is worth a fetch now.
        self._job_landed = asyncio.Event()
        self._piece_landed = asyncio.Event()
        self._polled = 0.0
        self._subs: list[Subscription] = []

    async def start(self) -> Intake:
        async def job_landed(_: Msg) -> None:
            self._job_landed.set()

        async def piece_landed(_: Msg) -> None:
            self._piece_landed.set()

        for subject, callback in ((self.jobs_subjects, job_landed), (self.pieces_subjects, piece_landed)):
            try:
                self._subs.append(await self.nc.subscribe(subject, cb=callback))
            except Exception as exc:  # a fetch every `poll` seconds still finds everything
                log.warning("cannot listen on %s (%s): new work is fetched every %.1f s", subject, exc, self.poll)
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def next(self, until: asyncio.Event) -> tuple[list[Msg], bool]:
        """A job, else a piece, else nothing after at most `poll` seconds or once `until` is
        set (the worker stopping); the caller loops."""
        clock = time.monotonic()
        due = clock - self._polled >= self.poll
        if due:
            self._polled = clock
        want_job, want_piece = due or self._job_landed.is_set(), due or self._piece_landed.is_set()
        # Cleared before the fetches: a publish during one sets them again, and is not missed.
        self._job_landed.clear()
        self._piece_landed.clear()
        if want_job and (msgs := await self._fetch(self.jobs)):
            self._job_landed.set()
            return msgs, False
        if want_piece and (msgs := await self._fetch(self.pieces)):
            self._piece_landed.set()
            return msgs, True
        if self._job_landed.is_set() or self._piece_landed.is_set() or until.is_set():
            return [], False
        waits = [asyncio.ensure_future(e.wait()) for e in (self._job_landed, self._piece_landed, until)]
        try:
            left = max(0.0, self._polled + self.poll - time.monotonic())
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return [], False

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        with contextlib.suppress(TimeoutError, NatsTimeout):
            return await sub.fetch(1, timeout=self.fetch_timeout)
        return []
