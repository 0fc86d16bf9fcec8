"""Fixtures chained like the architecture: server -> connection -> topology -> gateway/worker.

Every test gets its own subject prefix (so its own streams and buckets) on one real
`nats-server -js` started for the session on a random loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.topology import Topology
from evalq.worker import Worker

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE)

REPO = Path(__file__).resolve().parent.parent
EVALQ = [sys.executable, "-m", "evalq"]


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(nats_server: EmbeddedServer, tmp_path: Path) -> Settings:
    return Settings.of(
        nats_url=[nats_server.url],
        prefix=f"t{uuid.uuid4().hex[:10]}",
        home=str(tmp_path / "home"),
        handle_signals=False,
        advertise_inventory=False,
        ack_wait=5.0,
        heartbeat=1.0,
        grace=10.0,
        cancel_grace=3.0,
        progress_interval=0.5,
        request_timeout=10.0,
    )


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Any]:
    connection = await connect(settings, name="test")
    yield connection
    await connection.close()


@pytest.fixture
async def topology(nc: Any, settings: Settings) -> Topology:
    topo = Topology.from_settings(settings)
    await topo.ensure(nc.jetstream())
    return topo


@pytest.fixture
async def gateway(nc: Any, settings: Settings, topology: Topology) -> AsyncIterator[Gateway]:
    async with Gateway(nc, settings, topology) as service:
        yield service


@pytest.fixture
async def client(settings: Settings, gateway: Gateway) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(settings) as evalq_client:
        yield evalq_client


class RunningWorker:
    def __init__(self, worker: Worker, task: asyncio.Task[None], connection: Any) -> None:
        self.worker = worker
        self.task = task
        self.connection = connection

    async def stop(self) -> None:
        """Stop gracefully; a worker whose run loop failed or would not end fails the test."""
        self.worker.request_stop()
        try:
            await asyncio.wait_for(self.task, 60)
        finally:
            await self.worker.stop()
            await self.connection.close()


async def start_worker(settings: Settings, **overrides: Any) -> RunningWorker:
    """One in-process worker on its own connection, running until `stop()`."""
    worker_settings = settings.with_(**overrides)
    connection = await connect(worker_settings, name="test-worker")
    worker = await Worker(connection, worker_settings).start()
    return RunningWorker(worker, asyncio.create_task(worker.run()), connection)


class Workers:
    """In-process workers started by a test; leaving the block stops every one of them.

    All are stopped before the first failure among them is raised, so one broken worker
    does not leave the others running into the next test.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[RunningWorker] = []

    async def start(self, **overrides: Any) -> RunningWorker:
        handle = await start_worker(self.settings, **overrides)
        self.running.append(handle)
        return handle

    async def __aenter__(self) -> Workers:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        errors: list[BaseException] = []
        for handle in self.running:
            try:
                await handle.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
async def worker_factory(settings: Settings, topology: Topology) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers (each on its own connection); teardown stops them all."""
    async with Workers(settings) as workers:
        yield workers.start


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a subprocess the same settings."""
    env = dict(os.environ)
    env.update(
        EVALQ_NATS_URL=",".join(settings.connection.nats_url),
        EVALQ_PREFIX=settings.queue.prefix,
        EVALQ_HOME=settings.home,
        EVALQ_ACK_WAIT=str(settings.queue.ack_wait),
        EVALQ_HEARTBEAT=str(settings.worker.heartbeat),
        EVALQ_GRACE=str(settings.worker.grace),
        EVALQ_CANCEL_GRACE=str(settings.worker.cancel_grace),
        EVALQ_PROGRESS_INTERVAL=str(settings.worker.progress_interval),
        EVALQ_ADVERTISE_INVENTORY="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


async def run_command(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    """Run a command to its end (bounded); returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Processes:
    """Subprocesses a test starts; each is stopped by its pid at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str], name: str = "proc") -> subprocess.Popen[bytes]:
        log_path = self.tmp_path / f"{name}-{len(self.started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def worker(self, settings: Settings, **extra: str) -> subprocess.Popen[bytes]:
        return self.start([*EVALQ, "worker"], settings_env(settings, **extra), name="worker")

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
