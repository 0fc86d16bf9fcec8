"""The response journal, end to end: a worker killed past half of a job's documents, and the
server restarted, loses at most one flush window; the cache reuses answers only for the same
model, arguments and generation settings; a re-score runs today's scoring on recorded
responses with no model."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.policy import PoolPolicy, store_policy
from evalq.schemas import JobInfo, Started
from evalq.topology import Topology

from .conftest import Processes
from .events import all_events
from .test_merge_scores import CALLS_VARIABLE, TASK, counting_task
from .test_sharding import _samples
from .tiny_model import build_tiny_model
from .waiting import eventually

SLEEP_VARIABLE = "SCORE_SLEEP"
# Scoring a document takes this long: the kill lands in the middle of a job's scoring.
_SLOW = f'''

import time as _time

_counted = process_results


def process_results(doc, results):
    _time.sleep(float(_os.environ.get("{SLEEP_VARIABLE}", "0")))
    return _counted(doc, results)
'''
# Frames are written every 4 records (or 0.3 s), and published within 0.3 s.
FLUSH = {"journal_flush_records": 4, "journal_flush_seconds": 0.3}


def slow_task(root: Path) -> Path:
    counting_task(root)
    with open(root / TASK / "utils.py", "a") as handle:
        handle.write(_SLOW)
    return root


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _work(info: JobInfo) -> Any:
    assert info.status == "completed", info.error
    assert info.result is not None and info.result.work is not None, "the job reports no work"
    return info.result.work


@pytest.fixture
def own_server(tmp_path: Path) -> Any:
    server = EmbeddedServer(tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
async def test_a_killed_worker_and_a_restarted_server_lose_at_most_one_flush_window(
    own_server: EmbeddedServer, settings: Settings, processes: Processes, tmp_path: Path
) -> None:
    settings = settings.with_(nats_url=[own_server.url], request_timeout=3.0, ack_wait=4.0, **FLUSH)
    calls = tmp_path / "calls.txt"
    calls.touch()
    tasks = str(slow_task(tmp_path / "tasks"))
    env = {
        CALLS_VARIABLE: str(calls),
        SLEEP_VARIABLE: "0.1",
        "EVALQ_TASK_PATHS": tasks,
        "EVALQ_JOURNAL_FLUSH_RECORDS": str(FLUSH["journal_flush_records"]),
        "EVALQ_JOURNAL_FLUSH_SECONDS": str(FLUSH["journal_flush_seconds"]),
    }
    gateway_nc = await connect(settings)
    await Topology.from_settings(settings).ensure(gateway_nc.jetstream())
    gateway = await Gateway(gateway_nc, settings).start()
    try:
        await _kill_and_resume(own_server, settings, processes, tmp_path, calls, env)
    finally:
        await gateway.stop()
        await gateway_nc.close()


async def _kill_and_resume(
    own_server: EmbeddedServer,
    settings: Settings,
    processes: Processes,
    tmp_path: Path,
    calls: Path,
    env: dict[str, str],
) -> None:
    documents = 60
    job = {"model": "dummy", "tasks": [TASK], "limit": documents, "cache": "off"}
    async with AsyncClient(settings) as client:
        first = processes.worker(settings, **env)
        accepted = await client.submit(**job)
        # Past half of its documents scored: the worker dies, and its evaluation with it.
        await eventually(lambda: _lines(calls) > documents // 2, timeout=180, what="half the documents scored")
        evaluations = psutil.Process(first.pid).children(recursive=True)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        psutil.wait_procs(evaluations, timeout=10)
        scored_first = _lines(calls)
        assert scored_first < documents, "the first attempt finished before it was killed"
    # The journal is in JetStream's files: it outlives the server too.
    own_server.stop()
    own_server.start()
    async with AsyncClient(settings) as client:
        processes.worker(settings, **env)
        info = await client.wait_for_job(accepted.job_id, timeout=300)
        work = _work(info)
        events = await all_events(client, accepted.job_id)
        second = [event for event in events if isinstance(event, Started) and event.attempt == 2]
        assert len(second) == 1, [type(event).__name__ for event in events]
        resumed = second[0].resumed_scores
        # The second attempt scored exactly what its journal did not hold...
        scored_second = _lines(calls) - scored_first
        assert scored_second == documents - resumed == work.scores_computed, (scored_first, scored_second, resumed)
        assert work.scores_reused == resumed and work.responses_resumed == second[0].resumed_responses
        # ...and the journal lost at most one flush window of the first attempt's work: what
        # was scored in the last 0.3 s (4 documents on each of 4 threads) and published
        # within 0.3 s more, beside at most 3 records not yet written.
        assert scored_first - resumed <= 3 + 2 * 4 * 4, (scored_first, resumed)
        assert second[0].resumed_responses == documents, "every response was journaled before scoring began"
        assert work.responses_computed == 0

        # The same request uninterrupted gives the same metrics and samples.
        whole = await client.submit_and_wait(**job, timeout=300)
        assert _work(whole).scores_computed == documents
        assert info.result is not None and whole.result is not None
        assert info.result.metrics == whole.result.metrics
        resumed_files = await client.results(info.job_id, tmp_path / "resumed")
        whole_files = await client.results(whole.job_id, tmp_path / "whole")
        assert _samples(resumed_files, TASK) == _samples(whole_files, TASK)


async def test_the_cache_answers_only_the_same_model_arguments_and_generation(
    client: AsyncClient, worker_factory: Any
) -> None:
    await worker_factory()
    job = {"model": "dummy", "tasks": ["evalq_shard_demo"], "limit": 40, "cache": "read-write"}
    first = await client.submit_and_wait(**job, timeout=300)
    assert _work(first).responses_computed == 40 and _work(first).responses_reused == 0
    again = await client.submit_and_wait(**job, timeout=300)
    assert _work(again).responses_computed == 0 and _work(again).responses_reused == 40
    assert again.result is not None and first.result is not None and again.result.metrics == first.result.metrics

    other_args = await client.submit_and_wait(**job, model_args={"response": "B"}, timeout=300)
    assert _work(other_args).responses_reused == 0
    other_generation = await client.submit_and_wait(**job, gen_kwargs={"max_new_tokens": 5}, timeout=300)
    assert _work(other_generation).responses_reused == 0
    # Sampled answers are not cached unless the request names a seed.
    sampled = {**job, "gen_kwargs": {"temperature": 0.7, "do_sample": True}}
    await client.submit_and_wait(**sampled, timeout=300)
    assert _work(await client.submit_and_wait(**sampled, timeout=300)).responses_reused == 0
    await client.submit_and_wait(**sampled, seed=7, timeout=300)
    assert _work(await client.submit_and_wait(**sampled, seed=7, timeout=300)).responses_reused == 40
    off = await client.submit_and_wait(**{**job, "cache": "off"}, timeout=300)
    assert _work(off).responses_computed == 40


@pytest.mark.slow
async def test_a_checkpoint_overwritten_in_place_reuses_no_answer(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology, tmp_path: Path
) -> None:
    folder = build_tiny_model(tmp_path / "ckpt", seed=0)
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    await worker_factory()
    job = {
        "model": "huggingface",
        "tasks": ["evalq_demo"],
        "limit": 6,
        "model_args": {"pretrained": str(folder), "trust_remote_code": True, "device_map": "cpu"},
        "device": "cpu",
        "cache": "read-write",
    }
    first = await client.submit_and_wait(**job, timeout=300)
    assert _work(first).responses_computed == 6
    assert _work(await client.submit_and_wait(**job, timeout=300)).responses_reused == 6
    shutil.rmtree(folder)
    build_tiny_model(folder, seed=1)  # other weights, the same path
    assert _work(await client.submit_and_wait(**job, timeout=300)).responses_reused == 0


@pytest.mark.slow
async def test_a_rescore_applies_todays_scoring_with_no_model(
    client: AsyncClient, worker_factory: Any, nc: Any, topology: Topology, tmp_path: Path, monkeypatch: Any
) -> None:
    calls = tmp_path / "calls.txt"
    calls.touch()
    monkeypatch.setenv(CALLS_VARIABLE, str(calls))
    tasks = counting_task(tmp_path / "tasks")
    folder = build_tiny_model(tmp_path / "ckpt")
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    await worker_factory(task_paths=[str(tasks)])
    job = {
        "model": "huggingface",
        "tasks": [TASK],
        "limit": 12,
        "model_args": {"pretrained": str(folder), "trust_remote_code": True, "device_map": "cpu"},
        "device": "cpu",
    }
    source = await client.submit_and_wait(**job, timeout=300)
    assert _work(source).scores_computed == 12 and source.result is not None
    before = _lines(calls)
    # Today's scoring: every answer is right. The model is gone: a re-score never loads it.
    utils = tasks / TASK / "utils.py"
    utils.write_text(
        utils.read_text() + "\n\n_old = process_results\n\n\ndef process_results(doc, results):\n"
        '    scored = _old(doc, results)\n    return {**scored, "exact_match": 1.0}\n'
    )
    shutil.rmtree(folder)
    rescored = await client.submit_and_wait(**job, rescore_of=source.job_id, timeout=300)
    work = _work(rescored)
    assert work.responses_resumed == 12 and work.responses_computed == 0 and work.scores_computed == 12
    assert _lines(calls) - before == 12
    assert rescored.result is not None and rescored.result.metrics[TASK]["exact_match"] == 1.0
    started = [e for e in await all_events(client, rescored.job_id) if isinstance(e, Started)]
    assert started and started[0].loads_model is False
    assert rescored.request is not None and rescored.request.rescore_of == source.job_id
    # A re-score of a re-score reads the responses of the job that ran the model.
    again = await client.submit_and_wait(**job, rescore_of=rescored.job_id, timeout=300)
    assert _work(again).responses_resumed == 12 and again.result is not None
    assert again.result.metrics == rescored.result.metrics
