"""Helpers to wait on a job's events, bounded in time."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

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


async def all_events(client: AsyncClient, job_id: str, settle: float = 1.0) -> list[Event]:
    """Every stored event of a finished job (reads history, stops when none arrive for `settle` s)."""
    seen: list[Event] = []

    async def run() -> None:
        async for event in client.events(job_id, history=True):
            seen.append(event)

    try:
        await asyncio.wait_for(run(), settle)
    except TimeoutError:
        pass
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
