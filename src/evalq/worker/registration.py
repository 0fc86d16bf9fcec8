"""A worker's entry in the `<prefix>-workers` bucket: who it is, what it can run, what it runs.

The entry is written every heartbeat and carries its own time to live (`Nats-TTL`, three
heartbeats), so a worker that dies drops out of the bucket by itself, and workers with
different heartbeats share one bucket without one's setting expiring another's entry.
A worker that advertises its inventory is written only once it has it: an entry without
tasks would make the gateway accept any task, and `evalq tasks` answer nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import msgspec
from nats.aio.client import Client

from .. import jetstream
from ..schemas import WorkerInfo, encode, now
from .argv import scrubbed_env
from .inventory import InventorySource, take_inventory
from .pod_cost import PodCost

__all__ = ["Registration"]

log = logging.getLogger("evalq.worker")


class Registration:
    def __init__(
        self,
        nc: Client,
        bucket: str,
        info: WorkerInfo,
        *,
        heartbeat: float,
        timeout: float,
        pod_cost: PodCost | None = None,
    ) -> None:
        self.nc = nc
        # In a Kubernetes pod: its deletion cost says idle or busy as the entry does.
        self.pod_cost = pod_cost
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

    async def show(self, current_job: str | None) -> None:
        """Name the job in hand in the entry now, if the entry is wanted; best effort: the
        next heartbeat names it too."""
        if self.pod_cost is not None:
            self.pod_cost.want(current_job is not None)
        if self.wanted:
            with contextlib.suppress(Exception):
                await self.put(current_job=current_job)

    async def advertise(self, changes: dict[str, object], *, current_job: str | None) -> None:
        """Add what the worker can run to its entry, and write it (the first time, if it waited)."""
        self.info = msgspec.structs.replace(self.info, **changes)
        await self.put(current_job=current_job)

    async def advertise_inventory(
        self, include_dir: Path, warm: InventorySource | None, current_job: Callable[[], str | None]
    ) -> None:
        """Take the worker's inventory (`inventory.py`) and add it to the entry, which is
        written from then on; `current_job()` names the job in hand by then."""
        found = await take_inventory(include_dir, scrubbed_env(os.environ), warm)
        if found is None:
            return  # take_inventory said why; the worker still runs jobs, unlisted
        await self.advertise(
            dict(
                lmms_eval_version=found.lmms_eval_version,
                gpus=found.gpus,
                gpu_count=len(found.gpus),
                models=found.models,
                tasks=found.tasks,
            ),
            current_job=current_job(),
        )
        log.info("advertising %d models and %d tasks", len(found.models), len(found.tasks))

    async def beat(self, current_job: Callable[[], str | None]) -> None:
        """Rewrite the entry every heartbeat until closed; `current_job()` names the job in hand."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._closed:
            # Beats keep their period whatever a write took: a slow write followed by a full
            # period would leave the entry older than its TTL on a loaded host.
            due = max(due + self.heartbeat, loop.time())
            await asyncio.sleep(due - loop.time())
            if self.pod_cost is not None:
                self.pod_cost.want(current_job() is not None)
            if not self.wanted:
                continue
            try:
                await asyncio.wait_for(self.put(current_job=current_job()), timeout=self.heartbeat)
            except Exception as exc:  # a NATS outage must not end the heartbeat
                log.warning("heartbeat failed: %s", exc)

    async def remove(self) -> None:
        """Take the entry out at once (a delete marker), rather than after its TTL."""
        self._closed = True
        if self.pod_cost is not None:
            await self.pod_cost.close()
        if self.wanted:
            # The marker expires too: worker ids are new at every start, and markers that
            # stayed would pile up in a bucket that has no max age.
            marker = jetstream.key_delete(self.bucket, self.info.worker_id, ttl=3 * self.heartbeat)
            await jetstream.publish(self.nc, marker, timeout=self.timeout)
