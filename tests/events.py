"""Helpers to wait on a job's events, bounded in time."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.api import DeliverPolicy

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.schemas import Event, decode_event
from evalq.topology import Topology


async def follow(
    client: AsyncClient,
    job_id: str,
    timeout: float = 180.0,
    on_event: Callable[[Event], Awaitable[Any] | None] | None = None,
) -> list[Event]:
    """Every event of the job until its terminal one; `on_event` runs as each arrives."""
    seen: list[Event] = []

    async def run() -> None:
        async for event in client.watch(job_id):
            seen.append(event)
            if on_event is not None:
                result = on_event(event)
                if asyncio.iscoroutine(result):
                    await result

    await asyncio.wait_for(run(), timeout)
    return seen


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__struct_config__.tag for e in events]  # type: ignore[attr-defined]


async def all_events(client: AsyncClient, job_id: str, timeout: float = 30.0) -> list[Event]:
    """Every event the events stream holds for the job, oldest first.

    It counts the job's stored messages first and reads exactly that many: a reader that
    stopped after a quiet spell could come back short on a busy machine and turn "exactly
    one terminal event" into a pass by accident. Short of the count within `timeout`, it fails.
    """
    js = client.nc.jetstream()
    subjects = client.topology.events_filter(job_id)
    stream = client.topology.events_stream
    info = await js.stream_info(stream, subjects_filter=subjects)
    count = sum((info.state.subjects or {}).values())
    seen: list[Event] = []
    if count == 0:
        return seen
    sub = await js.subscribe(subjects, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    try:
        async with asyncio.timeout(timeout):
            async for msg in sub.messages:
                seen.append(decode_event(msg.data))
                if len(seen) == count:
                    break
    except TimeoutError:
        raise AssertionError(f"read {len(seen)} of the {count} stored events of job {job_id} in {timeout} s") from None
    finally:
        await sub.unsubscribe()
    return seen


async def job_history(settings: Settings) -> dict[str, list[Any]]:
    """Every event in the events stream, grouped by job."""
    topology = Topology.from_settings(settings)
    nc = await connect(settings)
    history: dict[str, list[Any]] = collections.defaultdict(list)
    try:
        js = nc.jetstream()
        count = (await js.stream_info(topology.events_stream)).state.messages
        sub = await js.subscribe(topology.events_filter(), ordered_consumer=True, stream=topology.events_stream)
        for _ in range(count):
            event = decode_event((await sub.next_msg(timeout=20)).data)
            history[event.job_id].append(event)
        await sub.unsubscribe()
    finally:
        await nc.close()
    return history
