"""Fault-injection fixtures: a nats-server of the test's own, which it may kill and restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.worker import Worker

STAND_IN = str(Path(__file__).resolve().parent.parent / "fake_evaluator.sh")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_settings(own_server: EmbeddedServer, settings: Settings) -> Settings:
    return settings.with_(nats_url=[own_server.url], request_timeout=3.0)


@contextlib.asynccontextmanager
async def stand_in_workers(settings: Settings, count: int, **overrides: Any) -> AsyncIterator[list[Worker]]:
    """`count` in-process workers running the shell stand-in; stopped (gracefully) on exit."""
    worker_settings = settings.with_(evaluator=[STAND_IN], **overrides)
    running: list[tuple[Worker, asyncio.Task[None], Any]] = []
    try:
        for _ in range(count):
            connection = await connect(worker_settings)
            worker = await Worker(connection, worker_settings).start()
            running.append((worker, asyncio.create_task(worker.run()), connection))
        yield [worker for worker, _, _ in running]
    finally:
        for worker, task, connection in running:
            worker.request_stop()
            await asyncio.wait_for(task, 60)
            await worker.stop()
            await connection.close()


def figure(name: str, **counts: int) -> None:
    """The one-line figure each fault test prints (`pytest -s` or the CI log shows it)."""
    print(f"\n[{name}] " + ", ".join(f"{key} {value}" for key, value in counts.items()))
