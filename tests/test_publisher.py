"""The SDK: push-based watch and wait, results, the blocking Client.

These use the stand-in evaluator: they test the client, not lmms-eval.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient, Client, ConnectError, JobCancelled, JobFailed, Timeout
from evalq.config import Settings
from evalq.schemas import Completed, JobInfo, JobResult, encode, now

from .conftest import EVALQ, Processes, settings_env
from .events import kinds

FAKE = [sys.executable, str(Path(__file__).parent / "fake_evaluator.py")]
JOB = {"model": "dummy", "tasks": ["evalq_demo"], "limit": 3}


@pytest.fixture
def fake_mode(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_mode(mode: str) -> None:
        monkeypatch.setenv("FAKE_EVAL_MODE", mode)

    return set_mode


async def test_watch_after_completion_returns_the_whole_history(client: AsyncClient, worker_factory: Any) -> None:
    await worker_factory(evaluator=FAKE)
    accepted = await client.submit(**JOB)
    info = await client.wait_for_job(accepted.job_id, timeout=60)
    assert info.status == "completed"
    late = [event async for event in client.watch(accepted.job_id)]
    assert kinds(late)[:2] == ["queued", "started"]
    assert kinds(late)[-1] == "completed"
    assert isinstance(late[-1], Completed) and late[-1].metrics == {"evalq_demo": {"exact_match": 0.6}}


async def test_wait_for_job_outcomes(client: AsyncClient, worker_factory: Any, fake_mode: Any) -> None:
    await worker_factory(evaluator=FAKE)
    done = await client.submit_and_wait(**JOB, timeout=60)
    assert done.status == "completed" and done.result is not None

    fake_mode("fail")
    failing = await client.submit(**JOB)
    with pytest.raises(JobFailed) as failed:
        await client.wait_for_job(failing.job_id, timeout=60)
    assert "no *_results.json" in failed.value.reason


async def test_wait_for_a_cancelled_job_and_a_timeout(client: AsyncClient) -> None:
    queued = await client.submit(**JOB)
    waiting = asyncio.create_task(client.wait_for_job(queued.job_id, timeout=30))
    await client.cancel_job(queued.job_id)
    with pytest.raises(JobCancelled):
        await waiting
    never = await client.submit(**JOB)  # no worker is running
    with pytest.raises(Timeout) as waited:
        await client.wait_for_job(never.job_id, timeout=0.5)
    assert isinstance(waited.value, TimeoutError) and never.job_id in str(waited.value)


async def test_events_follow_every_job(client: AsyncClient, worker_factory: Any) -> None:
    seen: list[str] = []

    async def subscriber() -> None:
        async for event in client.events(kind="completed"):
            seen.append(event.job_id)
            if len(seen) == 2:
                return

    listening = asyncio.create_task(subscriber())
    await worker_factory(evaluator=FAKE)
    ids = [(await client.submit(**JOB)).job_id for _ in range(2)]
    await asyncio.wait_for(listening, 60)
    assert sorted(seen) == sorted(ids)


async def test_results_download(client: AsyncClient, worker_factory: Any, tmp_path: Path) -> None:
    await worker_factory(evaluator=FAKE)
    info = await client.submit_and_wait(**JOB, timeout=60)
    files = await client.results(info.job_id, tmp_path)
    assert {f.name for f in files} == {"results.json", "eval.log"}
    assert all(f.is_relative_to(tmp_path / info.job_id) for f in files)


def _wait_ready(settings: Settings, timeout: float = 30.0) -> None:
    with Client(settings) as probe:
        for _ in range(int(timeout * 10)):
            if probe.is_healthy():
                return
            threading.Event().wait(0.1)  # the gateway process is still starting
    raise AssertionError("gateway did not start")


async def test_sync_client_inside_and_outside_a_running_loop(settings: Settings, processes: Processes) -> None:
    processes.start([*EVALQ, "gateway"], settings_env(settings), name="gateway")
    await asyncio.to_thread(_wait_ready, settings)

    def outside() -> str:
        with Client(settings) as client:
            accepted = client.submit(**JOB)
            assert client.get_job(accepted.job_id).status == "queued"
            return accepted.job_id

    job_id = await asyncio.to_thread(outside)  # a thread with no event loop
    # And here, inside a running loop: the client runs its own loop on a private thread.
    with Client(settings) as client:
        assert client.get_job(job_id).position_in_queue == 0
        assert client.cancel_job(job_id).status == "cancelled"
        with pytest.raises(JobCancelled):
            client.wait_for_job(job_id, timeout=10)
        events = list(client.watch(job_id))
        assert kinds(events) == ["queued", "cancelled"]
    with pytest.raises(ConnectError, match="closed"):
        client.get_job(job_id)


async def test_a_symlink_in_the_results_root_is_not_followed_out(
    client: AsyncClient, worker_factory: Any, settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = settings.results_root
    root.mkdir(parents=True, exist_ok=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    await worker_factory(evaluator=FAKE)
    with pytest.raises(JobFailed) as failed:
        await client.submit_and_wait(**JOB, output_dir="escape", timeout=60)
    assert "outside the results root" in failed.value.reason
    assert list(outside.iterdir()) == []


async def test_results_never_write_outside_the_destination(client: AsyncClient, nc: Any, tmp_path: Path) -> None:
    store = await nc.jetstream().object_store(client.topology.results_bucket)
    job = "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e"
    await store.put(f"{job}/../../escaped.txt", b"x")
    await store.put(f"{job}/results.json", b"{}")
    # A record that names the escaping object among its artifacts.
    named = JobResult(artifacts=[f"{job}/../../escaped.txt", f"{job}/results.json"])
    record = JobInfo(job_id=job, status="completed", created_at=now(), result=named)
    await (await nc.jetstream().key_value(client.topology.jobs_bucket)).put(job, encode(record))
    files = await client.results(job, tmp_path / "dest")
    assert [f.name for f in files] == ["results.json"]
    assert not (tmp_path / "escaped.txt").exists()
