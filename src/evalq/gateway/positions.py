"""Queue positions derived from the stream, never counted in memory.

    position(S) = |{s in stream : first_seq <= s < S, s not deleted}| - num_ack_pending

One snapshot (stream info with deleted details, plus consumer info) answers every
position in a pool. Concurrent callers share a snapshot taken after they asked, so a
burst of submissions pays one pair of round trips instead of one pair each.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from dataclasses import dataclass

from nats.aio.client import Client

from .. import jetstream
from ..topology import Topology

__all__ = ["PoolSnapshot", "Positions"]


@dataclass
class PoolSnapshot:
    first_seq: int
    messages: int
    deleted: list[int]  # sorted interior gaps
    ack_pending: int

    @property
    def queued(self) -> int:
        """Jobs waiting, not counting those a worker holds."""
        return max(0, self.messages - self.ack_pending)

    def position(self, seq: int) -> int:
        if seq < self.first_seq:
            return 0
        gaps = bisect.bisect_left(self.deleted, seq) - bisect.bisect_left(self.deleted, self.first_seq)
        return max(0, (seq - self.first_seq) - gaps - self.ack_pending)


class Positions:
    def __init__(self, nc: Client, topology: Topology, timeout: float = 5.0, *, domain: str | None = None) -> None:
        self.api = jetstream.Api.of(nc, domain=domain, timeout=timeout)
        self.topology = topology
        self._inflight: dict[str, tuple[float, asyncio.Future[PoolSnapshot]]] = {}
        self.fetches = 0  # snapshot reads actually made (for tests and benchmarks)

    async def snapshot(self, pool: str) -> PoolSnapshot:
        """A snapshot started no earlier than this call.

        While one is on its way, later callers wait for it to land and then share the next
        one: under load the reads cost one pair per round trip, not one pair per request.
        """
        asked = time.monotonic()
        while True:
            current = self._inflight.get(pool)
            if current is None:
                return await self._take(pool)
            started, future = current
            if started >= asked:
                return await asyncio.shield(future)
            with contextlib.suppress(Exception):
                await asyncio.shield(future)  # too old for this caller: wait, then share the next

    async def _take(self, pool: str) -> PoolSnapshot:
        future: asyncio.Future[PoolSnapshot] = asyncio.get_running_loop().create_future()
        self._inflight[pool] = (time.monotonic(), future)
        self.fetches += 1
        try:
            snap = await self._fetch(pool)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: joiners re-raise it themselves
            raise
        finally:
            if self._inflight.get(pool, (0.0, None))[1] is future:
                del self._inflight[pool]
        future.set_result(snap)
        return snap

    async def position(self, pool: str, seq: int) -> int:
        return (await self.snapshot(pool)).position(seq)

    async def _fetch(self, pool: str) -> PoolSnapshot:
        stream = self.topology.work_stream(pool)
        # Both errors propagate: a position computed without the consumer's count would be
        # wrong by every job a worker holds, so no answer is better than that one.
        info, consumer = await asyncio.gather(
            jetstream.stream_info(self.api, stream, deleted_details=True),
            jetstream.consumer_info(self.api, stream, self.topology.consumer),
        )
        return PoolSnapshot(
            first_seq=info.state.first_seq,
            messages=info.state.messages,
            deleted=sorted(info.state.deleted or []),
            ack_pending=consumer.num_ack_pending,
        )
