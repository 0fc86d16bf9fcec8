"""The SDK follows events and downloads results with no consumer, so least privilege holds.

A submitter of deploy/nats may not create consumers nor make any JetStream request
(tests/test_auth.py tries); these tests show what the SDK does instead, on the plain test
server: stored events read through the gateway by sequence, with a core subscription saying
when to read again, lose nothing and repeat nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient, EvalqError
from evalq.config import Settings
from evalq.gateway import Gateway
from evalq.schemas import JobInfo, Progress, ProgressEvent, encode, now
from evalq.topology import Topology

COUNT = 300


def progress(job_id: str, done: int) -> bytes:
    return encode(
        ProgressEvent(
            job_id=job_id, time=now(), progress=Progress(phase="running", done=done, total=COUNT, percent=0.0)
        )
    )


async def test_a_follower_joining_mid_stream_gets_every_event_once_in_order(
    nc: Any, topology: Topology, settings: Settings, gateway: Gateway
) -> None:
    js = nc.jetstream()
    job = str(uuid.uuid4())
    half = asyncio.Event()

    async def publish() -> None:
        for done in range(COUNT):
            await js.publish(topology.event_subject(job, "progress", team="default"), progress(job, done))
            if done == COUNT // 2:
                half.set()
            await asyncio.sleep(0)  # let the follower run between publishes

    async with AsyncClient(settings) as client:
        publishing = asyncio.create_task(publish())
        await asyncio.wait_for(half.wait(), 30)
        seen: list[int] = []
        consumers_while_following: list[Any] = []

        async def follow() -> None:
            async for event in client.events(job, history=True):
                assert isinstance(event, ProgressEvent)
                seen.append(event.progress.done)
                if len(seen) == COUNT // 2:
                    consumers_while_following.extend(await js.consumers_info(topology.events_stream))
                if len(seen) == COUNT:
                    return

        await asyncio.wait_for(follow(), 60)
        await publishing
    assert seen == list(range(COUNT))
    # Following made none: the only consumer is the queue's own notifier's.
    assert [c.name for c in consumers_while_following] == [topology.notify_consumer]


async def test_without_history_a_follower_starts_at_the_end(
    nc: Any, topology: Topology, settings: Settings, gateway: Gateway
) -> None:
    js = nc.jetstream()
    job = str(uuid.uuid4())
    for done in range(3):
        await js.publish(topology.event_subject(job, "progress", team="default"), progress(job, done))
    async with AsyncClient(settings) as client:
        live = client.events(job, "progress")
        first = asyncio.ensure_future(anext(live))
        done = 3
        # The follower subscribes when it first runs; publish until it has seen one.
        while not first.done():
            await js.publish(topology.event_subject(job, "progress", team="default"), progress(job, done))
            done += 1
            await asyncio.wait([first], timeout=0.05)
            assert done < 1000, "the follower never saw a live event"
        event = first.result()
        assert isinstance(event, ProgressEvent) and event.progress.done >= 3
        following = [event.progress.done]
        while following[-1] < done - 1:
            later = await asyncio.wait_for(anext(live), 10)
            assert isinstance(later, ProgressEvent)
            following.append(later.progress.done)
        await live.aclose()
    assert following == list(range(following[0], done))


async def test_results_are_read_whole_and_checked(
    nc: Any, client: AsyncClient, topology: Topology, tmp_path: Path
) -> None:
    store = await nc.jetstream().object_store(topology.results_bucket)
    job = str(uuid.uuid4())
    jobs = await nc.jetstream().key_value(topology.jobs_bucket)
    await jobs.put(job, encode(JobInfo(job_id=job, status="completed", created_at=now())))
    big = bytes(range(256)) * 1500  # 384,000 bytes: several chunks
    await store.put(f"{job}/results.json", big)
    files = await client.results(job, tmp_path)
    assert [f.name for f in files] == ["results.json"] and files[0].read_bytes() == big
    # A chunk gone from under its object is an error, never a short file.
    info = await store.get_info(f"{job}/results.json")
    stream = f"OBJ_{topology.results_bucket}"
    last = await nc.jetstream().get_msg(stream, subject=f"$O.{topology.results_bucket}.C.{info.nuid}")
    await nc.jetstream().delete_msg(stream, last.seq)
    with pytest.raises(EvalqError, match="incomplete"):
        await client.results(job, tmp_path / "again")


async def test_the_read_endpoint_pages_big_events_and_refuses_bad_input_with_a_path(
    nc: Any, topology: Topology, client: AsyncClient
) -> None:
    js = nc.jetstream()
    job = str(uuid.uuid4())
    phase = "x" * 200_000  # five events of about 200 KB: pages of two, under the server's 1 MiB
    for done in range(5):
        event = ProgressEvent(job_id=job, time=now(), progress=Progress(phase=phase, done=done, total=5, percent=0.0))
        await js.publish(topology.event_subject(job, "progress", team="default"), encode(event))
    first = await client.reads.events(job_id=job)
    assert len(first.events) == 2 and first.more
    seen = []
    async for event in client.events(job, history=True):
        assert isinstance(event, ProgressEvent)
        seen.append(event.progress.done)
        if len(seen) == 5:
            break
    assert seen == list(range(5))
    for body, path in (
        ({"op": "events", "limit": 0}, "$.limit"),
        ({"op": "events", "job_id": "a.b"}, "$.job_id"),
        ({"op": "events", "after": -1}, "$.after"),
        ({"op": "chunk"}, "$"),
        ({"op": "object", "name": "*/results.json"}, "$.name"),
        ({"op": "chunk", "name": "../x", "after": 0}, "$.name"),
        ({"op": "object", "name": "x", "extra": 1}, "$"),
        ({"op": "drop"}, "$"),
    ):
        reply = await nc.request(topology.subject("read"), encode(body), timeout=5)
        code = (reply.headers or {}).get("Nats-Service-Error-Code")
        assert code in ("400", "422"), (body, code, reply.data)
        assert json.loads(reply.data)["error"]["path"].startswith(path), (body, reply.data)
