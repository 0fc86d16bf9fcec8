"""A worker's entry in the `<prefix>-workers` bucket: who it is, what it can run, what it runs.

The entry is written every heartbeat and carries its own time to live (`Nats-TTL`, three
heartbeats), so a worker that dies drops out of the bucket by itself, and workers with
different heartbeats share one bucket without one's setting expiring another's entry.
A worker that advertises its inventory is written only once it has it: an entry without
tasks would make the gateway accept any task, and `evalq tasks` answer nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client

from .. import jetstream
from ..schemas import WorkerInfo, encode, now

__all__ = ["Registration"]

log = logging.getLogger("evalq.worker")


class Registration:
    def __init__(self, nc: Client, bucket: str, info: WorkerInfo, *, heartbeat: float, timeout: float) -> None:
        self.nc = nc
        self.bucket = bucket
        self.info = msgspec.structs.replace(info, ttl=3 * heartbeat)
        self.heartbeat = heartbeat
        self.timeout = timeout
        # Should be in the bucket (once it has its inventory, when it advertises one): the
        # heartbeat writes it while this holds, so one failed first write is not the last.
        self.wanted = False
        self._closed = False

    async def put(self, *, current_job: str | None) -> None:
        self.info = msgspec.structs.replace(self.info, heartbeat_at=now(), current_job=current_job)
        write = jetstream.key_put(self.bucket, self.info.worker_id, encode(self.info), ttl=self.info.ttl)
        self.wanted = True
        await jetstream.publish(self.nc, write, timeout=self.timeout)

    async def advertise(self, changes: dict[str, object], *, current_job: str | None) -> None:
        """Add what the worker can run to its entry, and write it (the first time, if it waited)."""
        self.info = msgspec.structs.replace(self.info, **changes)
        await self.put(current_job=current_job)

    async def beat(self, current_job: Callable[[], str | None]) -> None:
        """Rewrite the entry every heartbeat until closed; `current_job()` names the job in hand."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._closed:
            # Beats keep their period whatever a write took: a slow write followed by a full
            # period would leave the entry older than its TTL on a loaded host.
            due = max(due + self.heartbeat, loop.time())
            await asyncio.sleep(due - loop.time())
            if not self.wanted:
                continue
            try:
                await asyncio.wait_for(self.put(current_job=current_job()), timeout=self.heartbeat)
            except Exception as exc:  # a NATS outage must not end the heartbeat
                log.warning("heartbeat failed: %s", exc)

    async def remove(self) -> None:
        """Take the entry out at once (a delete marker), rather than after its TTL."""
        self._closed = True
        if self.wanted:
            # The marker expires too: worker ids are new at every start, and markers that
            # stayed would pile up in a bucket that has no max age.
            marker = jetstream.key_delete(self.bucket, self.info.worker_id, ttl=3 * self.heartbeat)
            await jetstream.publish(self.nc, marker, timeout=self.timeout)
