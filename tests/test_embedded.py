"""The embedded nats-server: starts on loopback, keeps its store, stops cleanly; one server
per store, and none outlives the process that started it."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from evalq import AsyncClient, embedded
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import LOCK_NAME, EmbeddedServer
from evalq.errors import ConnectError, ServerNotFound, StoreLocked

from .conftest import EVALQ, Processes, run_command
from .jobs import JOB, STAND_IN
from .waiting import eventually


async def test_store_survives_a_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "store")
    server.start()
    try:
        assert server.url.startswith("nats://127.0.0.1:")
        nc = await connect(Settings.of(nats_url=[server.url]))
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.one", b"1")
        await nc.close()
    finally:
        server.stop()
    assert server.process is None

    again = EmbeddedServer(tmp_path / "store")
    again.start()
    try:
        nc = await connect(Settings.of(nats_url=[again.url]))
        info = await nc.jetstream().stream_info("KEEP")
        assert info.state.messages == 1
        await nc.close()
    finally:
        again.stop()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerNotFound, match="evalq\\[server\\]"):
        embedded.find_nats_server()


def test_found_beside_the_interpreter() -> None:
    assert os.access(embedded.find_nats_server(), os.X_OK)


async def test_unreachable_server_gives_a_hint() -> None:
    with pytest.raises(ConnectError, match="evalq up"):
        await connect(Settings.of(nats_url=["nats://127.0.0.1:1"], connect_timeout=1))


def test_a_second_server_on_a_store_is_refused_until_the_first_stops(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = EmbeddedServer(store).start()
    try:
        with pytest.raises(StoreLocked) as refused:
            EmbeddedServer(store).start()
        assert str(refused.value) == f"another evalq server uses {store} (pid {os.getpid()})"
        assert first.process is not None and first.process.poll() is None
    finally:
        first.stop()
    EmbeddedServer(store).start().stop()  # stopping released the lock


def test_a_server_that_cannot_start_says_why_first(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerNotFound) as failed:
            EmbeddedServer(tmp_path / "store", port=taken.getsockname()[1]).start()
    message = str(failed.value)
    assert message.startswith("nats-server did not start: Error listening on port"), message
    assert "bind: address already in use" in message.splitlines()[0]
    EmbeddedServer(tmp_path / "store").start().stop()  # the failed start released the lock


async def test_a_server_started_from_a_thread_outlives_the_thread(tmp_path: Path) -> None:
    # The parent-death signal follows the thread that started the child: this is how the
    # tests and `asyncio.to_thread` start servers, and the server must live on after it.
    server = EmbeddedServer(tmp_path / "store")
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join(30)
    try:
        assert server.pid is not None
        with pytest.raises(psutil.TimeoutExpired):
            psutil.Process(server.pid).wait(timeout=1)
        nc = await connect(Settings.of(nats_url=[server.url]))
        await nc.jetstream().add_stream(name="ALIVE", subjects=["alive.>"])
        await nc.close()
    finally:
        server.stop()


# --- `evalq up`, as a user runs it ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def up_env(home: Path, evaluator: str = STAND_IN) -> dict[str, str]:
    return {
        **os.environ,
        "EVALQ_HOME": str(home),
        "EVALQ_EVALUATOR": evaluator,
        "EVALQ_WARM_EVALUATOR": "false",
        "EVALQ_ADVERTISE_INVENTORY": "false",
        "PYTHONUNBUFFERED": "1",
    }


async def wait_until_up(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    """The URL `evalq up` prints once it serves; fails if it exits or stays silent."""
    log_path: Path = proc.log_path  # type: ignore[attr-defined]

    def served() -> re.Match[str] | None:
        found = re.search(r"evalq up: (nats://\S+)", log_path.read_text(errors="replace"))
        assert found or proc.poll() is None, f"evalq up exited ({proc.returncode}): {log_path.read_text()}"
        return found

    found = await eventually(served, timeout=timeout, what=lambda: f"evalq up to serve: {log_path.read_text()}")
    return found.group(1)


def nats_child(proc: subprocess.Popen[bytes]) -> psutil.Process:
    (child,) = [p for p in psutil.Process(proc.pid).children() if p.name() == "nats-server"]
    return child


def snapshot(store: Path) -> dict[str, tuple[int, str]]:
    return {
        str(path.relative_to(store)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(store.rglob("*"))
        if path.is_file()
    }


@pytest.mark.slow
async def test_a_second_up_on_one_home_exits_at_once_and_leaves_the_store_alone(
    tmp_path: Path, processes: Processes
) -> None:
    home, gate = tmp_path / "home", tmp_path / "go"
    # Jobs wait for the gate, so they are still queued when the second `up` comes.
    gated = tmp_path / "gated.sh"
    gated.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\nexec "{STAND_IN}" "$@"\n')
    gated.chmod(0o755)
    first = processes.start([*EVALQ, "up", "--port", str(free_port())], up_env(home, str(gated)), name="up")
    url = await wait_until_up(first)
    server = nats_child(first)

    async with AsyncClient(Settings.of(nats_url=[url], request_timeout=10.0)) as client:
        job_ids = [(await client.submit(**JOB)).job_id for _ in range(4)]
        assert [(await client.get_job(job_id)).status for job_id in job_ids[1:]] == ["queued"] * 3

        # Freeze the first instance so that nothing it does moves the store while the
        # second one tries: any change to the files is then the second one's.
        for proc in (psutil.Process(first.pid), server):
            proc.suspend()
        try:
            store = home / "nats"
            before = snapshot(store)
            assert any(name.startswith("jetstream/") for name in before)
            code, out, err = await run_command([*EVALQ, "up", "--port", str(free_port())], up_env(home), timeout=60)
            assert code == 1, (out, err)
            assert err.strip() == f"error: another evalq server uses {store} (pid {first.pid})", err
            assert snapshot(store) == before
        finally:
            for proc in (server, psutil.Process(first.pid)):
                proc.resume()

        gate.touch()
        for job_id in job_ids:
            assert (await client.wait_for_job(job_id, timeout=60)).status == "completed"
    assert first.poll() is None and server.is_running()


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie no one has reaped yet (it holds nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
async def test_a_killed_up_leaves_no_server_behind(tmp_path: Path, processes: Processes) -> None:
    home, port = tmp_path / "home", free_port()
    first = processes.start([*EVALQ, "up", "--port", str(port)], up_env(home), name="up")
    await wait_until_up(first)
    server = nats_child(first)

    os.kill(first.pid, signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    await eventually(
        lambda: gone(server.pid),
        timeout=10,
        what=f"nats-server {server.pid} to end with its killed evalq up",
        interval=0.05,
    )

    # The same port and the same store are free: a new `up` serves the queue.
    again = processes.start([*EVALQ, "up", "--port", str(port)], up_env(home), name="up")
    url = await wait_until_up(again)
    async with AsyncClient(Settings.of(nats_url=[url], request_timeout=10.0)) as client:
        assert (await client.submit_and_wait(**JOB, timeout=60)).status == "completed"
    assert (home / "nats" / LOCK_NAME).read_text().strip() == str(again.pid)
