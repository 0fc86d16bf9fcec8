"""The gateway's view of the workers bucket: only ready workers say what can run (real NATS)."""

from __future__ import annotations

from typing import Any

import pytest

from evalq.errors import InvalidField
from evalq.gateway.directory import WorkerDirectory, is_ready
from evalq.schemas import EvaluateRequest, WorkerInfo, encode
from evalq.topology import Topology


def worker(worker_id: str, *, tasks: list[str] | None, models: list[str] | None = None) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, host="host", pid=1, tasks=tasks, models=models)


async def test_a_worker_without_its_inventory_is_not_ready(nc: Any, topology: Topology) -> None:
    kv = await nc.jetstream().key_value(topology.workers_bucket)
    # A long max_age: any answer below that sees the second worker read the bucket afresh.
    directory = WorkerDirectory(kv, max_age=3600)
    await kv.put("listing", encode(worker("listing", tasks=None)))
    assert not is_ready(worker("listing", tasks=None)) and is_ready(worker("none", tasks=[]))
    assert await directory.ready_workers() == []
    assert await directory.tasks() == [] and await directory.models() == []
    # Nothing is known yet: anything is accepted.
    await directory.check(EvaluateRequest(model="anything", tasks=["whatever"]))

    await kv.put("ready", encode(worker("ready", tasks=["evalq_demo"], models=["dummy"])))
    assert await directory.tasks() == ["evalq_demo"]
    assert await directory.models() == ["dummy"]
    assert [w.worker_id for w in await directory.ready_workers()] == ["ready"]
    assert [w.worker_id for w in await directory.workers()] == ["listing", "ready"]
    with pytest.raises(InvalidField, match="unknown task 'whatever'"):
        await directory.check(EvaluateRequest(model="dummy", tasks=["whatever"]))
