"""The worker registry: followed from the workers bucket by a watch, entries expiring by their
own TTL, and `evalq health` never without a worker that keeps beating (real NATS)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.errors import InvalidField
from evalq.gateway import Gateway
from evalq.jetstream import key_delete, key_put, publish
from evalq.registry import Registry, cannot_run, is_ready
from evalq.schemas import EvaluateRequest, WorkerInfo, encode
from evalq.topology import Topology

from .jobs import FAKE
from .waiting import eventually


def worker(
    worker_id: str, *, tasks: list[str] | None, models: list[str] | None = None, ttl: float | None = None
) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, host="host", pid=1, tasks=tasks, models=models, ttl=ttl)


async def ids(registry: Registry) -> list[str]:
    return [w.worker_id for w in await registry.workers()]


async def test_a_worker_without_its_inventory_is_listed_but_says_nothing(nc: Any, topology: Topology) -> None:
    kv = await nc.jetstream().key_value(topology.workers_bucket)
    registry = await Registry(kv).start(5.0)
    try:
        assert registry.loaded.is_set()
        await kv.put("listing", encode(worker("listing", tasks=None)))
        assert not is_ready(worker("listing", tasks=None)) and is_ready(worker("none", tasks=[]))
        await eventually(lambda: ids(registry), timeout=5, what="the first entry reaches the registry")
        assert await registry.ready() == []
        assert await registry.tasks() == [] and await registry.models() == []
        # Nothing is known yet: anything is accepted.
        await registry.check(EvaluateRequest(model="anything", tasks=["whatever"]))

        await kv.put("ready", encode(worker("ready", tasks=["evalq_demo"], models=["dummy"])))
        await eventually(lambda: registry.tasks(), timeout=5, what="the ready worker's tasks")
        assert await registry.tasks() == ["evalq_demo"]
        assert await registry.models() == ["dummy"]
        assert [w.worker_id for w in await registry.ready()] == ["ready"]
        assert await ids(registry) == ["listing", "ready"]
        with pytest.raises(InvalidField, match="unknown task 'whatever'") as refused:
            await registry.check(EvaluateRequest(model="dummy", tasks=["whatever"]))
        assert refused.value.path == "$.tasks[0]"
        with pytest.raises(InvalidField, match="unknown model") as refused:
            await registry.check(EvaluateRequest(model="other", tasks=["evalq_demo"]))
        assert refused.value.path == "$.model"
        # Another pool's workers say nothing about this one.
        await registry.check(EvaluateRequest(model="other", tasks=["whatever"], pool="elsewhere"))
        # A one-pass read sees what the follower sees.
        assert [w.worker_id for w in await Registry.read(kv)] == ["listing", "ready"]
    finally:
        await registry.stop()


async def test_entries_leave_by_their_own_ttl_or_at_once_when_deleted(nc: Any, topology: Topology) -> None:
    kv = await nc.jetstream().key_value(topology.workers_bucket)
    bucket = topology.workers_bucket
    registry = await Registry(kv).start(5.0)
    try:
        await publish(nc, key_put(bucket, "brief", encode(worker("brief", tasks=[], ttl=1.0)), ttl=1.0), timeout=5)
        await publish(nc, key_put(bucket, "long", encode(worker("long", tasks=[], ttl=60.0)), ttl=60.0), timeout=5)
        await publish(
            nc, key_put(bucket, "leaving", encode(worker("leaving", tasks=[], ttl=60.0)), ttl=60.0), timeout=5
        )
        listed = await eventually(_count(registry, 3), timeout=5, what="three entries followed")
        written = time.monotonic()
        assert listed == ["brief", "leaving", "long"]

        await publish(nc, key_delete(bucket, "leaving", ttl=60.0), timeout=5)
        await eventually(_without(registry, "leaving"), timeout=5, what="the deleted entry gone")
        # Nothing tells the registry of an expiry: it applies the entry's TTL itself.
        gone = await eventually(_without(registry, "brief"), timeout=5, what="the 1 s entry expires")
        assert gone == ["long"]
        assert time.monotonic() - written >= 0.9, "the entry left before its TTL"
        assert [w.worker_id for w in await Registry.read(kv)] == ["long"]
    finally:
        await registry.stop()


def _count(registry: Registry, n: int) -> Any:
    async def check() -> list[str] | None:
        listed = await ids(registry)
        return listed if len(listed) == n else None

    return check


def _without(registry: Registry, worker_id: str) -> Any:
    async def check() -> list[str] | None:
        listed = await ids(registry)
        return listed if worker_id not in listed else None

    return check


def test_what_a_worker_cannot_run_is_said() -> None:
    able = worker("a", tasks=["evalq_demo"], models=["dummy"])
    assert cannot_run(able, EvaluateRequest(model="dummy", tasks=["evalq_demo"])) is None
    assert "model 'hf'" in (cannot_run(able, EvaluateRequest(model="hf", tasks=["evalq_demo"])) or "")
    assert "tasks x, y" in (cannot_run(able, EvaluateRequest(model="dummy", tasks=["x", "y"])) or "")
    assert "num_gpus=2" in (cannot_run(able, EvaluateRequest(model="dummy", tasks=["evalq_demo"], num_gpus=2)) or "")
    assert cannot_run(worker("b", tasks=None), EvaluateRequest(model="hf", tasks=["x"])) is None


_WATCHED = 35.0


@pytest.mark.slow
async def test_health_never_shows_zero_workers_while_one_keeps_beating(
    settings: Settings, client: AsyncClient, worker_factory: Any
) -> None:
    # A 10 s heartbeat: the entry (its TTL three beats) is rewritten only three times in the
    # 35 s watched, and a second gateway beside the first restarts twice while health is
    # asked every 0.25 s.
    beating = await worker_factory(evaluator=FAKE, heartbeat=10.0)
    await eventually(lambda: _lists(client, beating.worker.worker_id), timeout=60, what="the worker in health")
    samples: list[int] = []
    restarts = 0

    async def poll() -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + _WATCHED
        while loop.time() < end:
            # A request that times out or fails ends the test: it is an answer health did not give.
            health = await client.health()
            listed = [w.worker_id for w in health.workers]
            at = _WATCHED - (end - loop.time())
            assert beating.worker.worker_id in listed, f"health showed {listed} at {at:.2f} s"
            samples.append(len(listed))
            await asyncio.sleep(0.25)

    async def restart_beside() -> None:
        nonlocal restarts
        for _ in range(3):
            nc = await connect(settings, name="gateway-beside")
            try:
                async with Gateway(nc, settings):
                    await asyncio.sleep(10)  # a gateway's lifetime, not a wait for a condition
            finally:
                await nc.close()
            restarts += 1

    polling = asyncio.create_task(poll())
    beside = asyncio.create_task(restart_beside())
    try:
        await asyncio.wait_for(asyncio.shield(polling), timeout=_WATCHED + 30)
    finally:
        beside.cancel()
        await asyncio.gather(beside, return_exceptions=True)
    assert restarts >= 2, "the gateway beside was not restarted"
    assert len(samples) >= _WATCHED / 0.25 * 0.5, f"only {len(samples)} polls in {_WATCHED} s"
    assert min(samples) >= 1


async def _lists(client: AsyncClient, worker_id: str) -> bool:
    return worker_id in [w.worker_id for w in (await client.health()).workers]
