"""Sharded jobs: one evaluation split across a pool's workers, pieces pulled as workers free
up, merged exactly, and resumed piece by piece."""

from __future__ import annotations

import itertools
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NotFoundError

from evalq import AsyncClient, JobCancelled, JobFailed, PoolPolicy, lifecycle, sharding
from evalq.config import Settings
from evalq.jobstore import JobStore
from evalq.policy import store_policy
from evalq.schemas import EvaluateRequest, JobInfo, PieceItem, ShardStarted, decode, now
from evalq.topology import Topology

from .conftest import Processes
from .events import all_events, follow, kinds
from .jobs import FAKE
from .tiny_model import build_tiny_model
from .waiting import eventually

BOTH = {"model": "dummy", "tasks": ["evalq_demo", "evalq_shard_demo"]}
# What an unsharded run of BOTH gives (the first test checks it against a real one).
UNSHARDED = {
    "evalq_demo": {"exact_match": 0.6},
    "evalq_shard_demo": {"exact_match": 19 / 240, "macro_f1": 0.03667953667953668},
}


async def _results_json(client: AsyncClient, job_id: str, dest: Path) -> dict[str, Any]:
    files = await client.results(job_id, dest)
    found = [p for p in files if p.name == "results.json"]
    assert found, f"no results.json among {[p.name for p in files]}"
    return json.loads(found[0].read_text())  # type: ignore[no-any-return]


def _samples(files: list[Path], task: str) -> list[dict[str, Any]]:
    path = next(p for p in files if p.name.endswith(f"_samples_{task}.jsonl"))
    keep = ("doc_id", "target", "resps", "filtered_resps", "exact_match", "macro_f1")
    return [{k: v for k, v in json.loads(line).items() if k in keep} for line in path.read_text().splitlines()]


async def _assert_same_run(client: AsyncClient, whole: JobInfo, sharded: JobInfo, tmp_path: Path) -> list[Path]:
    """The sharded job's results and samples are the unsharded job's; returns the sharded job's files."""
    expected = await _results_json(client, whole.job_id, tmp_path / f"{whole.job_id}-results")
    got = await _results_json(client, sharded.job_id, tmp_path / f"{sharded.job_id}-results")
    # Every metric and stderr key, with exact float equality.
    assert got["results"] == expected["results"]
    assert got.get("groups") == expected.get("groups")
    assert got["n-samples"] == expected["n-samples"]
    assert sharded.result is not None and whole.result is not None
    assert sharded.result.metrics == whole.result.metrics
    # Samples per task, in document order, as the unsharded run wrote them.
    whole_files = await client.results(whole.job_id, tmp_path / f"{whole.job_id}-files")
    sharded_files = await client.results(sharded.job_id, tmp_path / f"{sharded.job_id}-files")
    for task in expected["n-samples"]:
        samples = _samples(sharded_files, task)
        assert samples == _samples(whole_files, task)
        assert [s["doc_id"] for s in samples] == sorted(s["doc_id"] for s in samples)
    return sharded_files


@pytest.mark.slow
async def test_a_sharded_run_gives_the_unsharded_results_key_for_key(
    client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    for _ in range(2):
        await worker_factory()
    whole = await client.submit(**BOTH)
    sharded = await client.submit(**BOTH, shards=5)
    whole_info = await client.wait_for_job(whole.job_id, timeout=300)
    sharded_info = await client.wait_for_job(sharded.job_id, timeout=300)
    assert whole_info.status == "completed", whole_info.error
    assert sharded_info.status == "completed", sharded_info.error
    assert (sharded_info.shards, sharded_info.shards_done) == (5, 5)
    assert sorted(p.docs for p in sharded_info.pieces) == [20, 60, 60, 60, 60]

    sharded_files = await _assert_same_run(client, whole_info, sharded_info, tmp_path)
    assert whole_info.result is not None
    for task, metrics in UNSHARDED.items():
        for name, value in metrics.items():
            assert whole_info.result.metrics[task][name] == value
    for index in range(5):
        assert any(p.as_posix().endswith(f"/shards/{index}/eval.log") for p in sharded_files), (
            f"no log of piece {index}"
        )

    events = await all_events(client, sharded.job_id)
    names = kinds(events)
    assert names[0] == "queued" and names[-1] == "completed"
    assert names.count("started") == 1 and names.count("shard_started") == 5 and names.count("shard_completed") == 5
    progress = [e.progress for e in events if e.__struct_config__.tag == "progress"]  # type: ignore[attr-defined]
    assert progress and progress[-1].total == 260, "progress counts documents across all pieces"
    assert all(a.done <= b.done for a, b in itertools.pairwise(progress))


@pytest.mark.slow
async def test_a_fractional_limit_is_split_as_lmms_eval_applies_it(
    client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    """lmms-eval 0.7.3 turns a fraction into a count, ceil(documents * limit), on the first task
    it builds (evalq_shard_demo: lmms-eval orders these two tasks in reverse) and then applies
    that count to every task after it: evalq_demo runs all its 20 documents, not half."""
    for _ in range(2):
        await worker_factory()
    # 0.5 of 240 is 120, evalq_demo's 20 a whole piece; 0.31 of 240 is 74.4, rounded up to
    # 75, an odd count that splits 38 + 37.
    cases = {0.5: (4, [20, 40, 40, 40]), 0.31: (3, [20, 37, 38])}
    submitted = {}
    for limit, (shards, _) in cases.items():
        whole = await client.submit(**BOTH, limit=limit)
        sharded = await client.submit(**BOTH, limit=limit, shards=shards)
        submitted[limit] = (whole.job_id, sharded.job_id)
    for limit, (whole_id, sharded_id) in submitted.items():
        shards, sizes = cases[limit]
        whole_info = await client.wait_for_job(whole_id, timeout=300)
        sharded_info = await client.wait_for_job(sharded_id, timeout=300)
        assert whole_info.status == "completed", whole_info.error
        assert sharded_info.status == "completed", (limit, sharded_info.error)
        assert (sharded_info.shards, sharded_info.shards_done) == (shards, shards)
        assert sorted(p.docs for p in sharded_info.pieces) == sizes
        expected = await _results_json(client, whole_id, tmp_path / f"{limit}-counts")
        effective = {task: n["effective"] for task, n in expected["n-samples"].items()}
        assert effective == {"evalq_demo": 20, "evalq_shard_demo": sum(sizes) - 20}
        await _assert_same_run(client, whole_info, sharded_info, tmp_path)


@pytest.mark.slow
async def test_a_transformers_model_sharded_gives_the_unsharded_results(
    client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    """A real forward pass: lmms-eval's huggingface model answers with GenerationResult
    objects, which the pieces record and the merge replays."""
    model_dir = build_tiny_model(tmp_path / "tiny")
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    await worker_factory()
    job = {
        "model": "huggingface",
        "tasks": ["evalq_demo"],
        "limit": 8,
        "model_args": {"pretrained": str(model_dir), "trust_remote_code": True, "device_map": "cpu"},
        "device": "cpu",
    }
    whole = await client.submit_and_wait(**job, timeout=300)
    sharded = await client.submit_and_wait(**job, shards=3, timeout=300)
    assert whole.status == sharded.status == "completed", (whole.error, sharded.error)
    assert sharded.shards == 3 and whole.result is not None and sharded.result is not None
    assert sharded.result.metrics == whole.result.metrics
    whole_files = await client.results(whole.job_id, tmp_path / "whole")
    sharded_files = await client.results(sharded.job_id, tmp_path / "sharded")
    assert _samples(sharded_files, "evalq_demo") == _samples(whole_files, "evalq_demo")
    # The pieces ran on the worker's resident model, loaded by the unsharded job before them.
    piece_logs = [p.read_text(errors="replace") for p in sharded_files if p.parent.parent.name == "shards"]
    assert len(piece_logs) == 3 and all("[evalq resident] model reused" in text for text in piece_logs)


@pytest.mark.slow
async def test_a_piece_of_a_killed_worker_runs_again_alone_and_the_metrics_hold(
    settings: Settings, topology: Topology, client: AsyncClient, processes: Processes
) -> None:
    env = {"EVALQ_ACK_WAIT": "5"}
    workers = {name: processes.worker(settings, EVALQ_WORKER_ID=name, **env) for name in ("w-one", "w-two")}
    killed: list[str] = []
    accepted = await client.submit(**BOTH, shards=5)

    async def on_event(event: Any) -> None:
        if isinstance(event, ShardStarted) and not killed:
            killed.append(f"{event.worker}:{event.shard}")
            os.kill(workers[event.worker or ""].pid, signal.SIGKILL)

    events = await follow(client, accepted.job_id, timeout=400, on_event=on_event)
    assert killed, kinds(events)
    info = await client.get_job(accepted.job_id)
    assert info.status == "completed", info.error
    assert info.result is not None
    for task, metrics in UNSHARDED.items():
        for name, value in metrics.items():
            assert info.result.metrics[task][name] == value
    victim_worker, victim_shard = killed[0].split(":")
    starts: dict[int, list[ShardStarted]] = {}
    for event in events:
        if isinstance(event, ShardStarted):
            starts.setdefault(event.shard, []).append(event)
    assert len(starts[int(victim_shard)]) == 2, "the killed worker's piece ran again"
    assert starts[int(victim_shard)][1].worker != victim_worker
    assert all(len(runs) == 1 for shard, runs in starts.items() if shard != int(victim_shard)), (
        "a piece that was not the killed worker's ran twice"
    )


async def test_cancelling_a_sharded_job_stops_every_running_piece(
    settings: Settings, client: AsyncClient, worker_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EVAL_MODE", "slow")
    handles = [await worker_factory(evaluator=FAKE) for _ in range(3)]
    accepted = await client.submit(model="dummy", tasks=["fake"], limit=40, shards=6)
    pids: set[int] = set()

    def three_running() -> bool:
        for handle in handles:
            current = handle.worker.current
            if current is not None and current.piece is not None and current.process is not None:
                pids.add(current.process.pid or 0)
        return len(pids) >= 3

    await eventually(
        three_running, timeout=60, what=lambda: f"three pieces to run at once (seen pids {sorted(pids)})", interval=0.05
    )
    reply = await client.cancel_job(accepted.job_id)
    assert reply.status == "cancelling"
    with pytest.raises(JobCancelled):
        await client.wait_for_job(accepted.job_id, timeout=60)
    info = await client.get_job(accepted.job_id)
    assert info.status == "cancelled"
    assert {p.status for p in info.pieces} == {"cancelled"}
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    events = await all_events(client, accepted.job_id)
    assert kinds(events)[-1] == "cancelled" and kinds(events).count("shard_started") == 3


async def test_a_piece_that_keeps_failing_fails_the_job_and_stops_the_others(
    settings: Settings, client: AsyncClient, worker_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL_OFFSET", "0")
    for _ in range(2):
        await worker_factory(evaluator=FAKE, max_attempts=2)
    accepted = await client.submit(model="dummy", tasks=["fake"], limit=30, shards=3)
    with pytest.raises(JobFailed):
        await client.wait_for_job(accepted.job_id, timeout=90)
    info = await client.get_job(accepted.job_id)
    assert info.status == "failed"
    assert info.error and "piece" in info.error and "failed 2 times" in info.error
    events = await all_events(client, accepted.job_id)
    failed = [e for e in events if e.__struct_config__.tag == "shard_failed"]  # type: ignore[attr-defined]
    assert len(failed) == 2 and {e.attempt for e in failed} == {1, 2}  # type: ignore[attr-defined]
    assert kinds(events)[-1] == "failed"


async def test_the_dispatcher_publishes_a_released_piece_whose_message_went_missing(
    nc: Any, topology: Topology, gateway: Any
) -> None:
    # A record as a gateway that died between a release and its publish leaves it: piece 0
    # released with no message, piece 1 still held (the pool has no quota now: it goes too).
    request = EvaluateRequest(model="dummy", tasks=["evalq_demo"], shards=2)
    job_id = str(uuid.uuid4())
    queued = lifecycle.enqueue(job_id, request, created_at=now(), stream_seq=None)
    started = lifecycle.start(queued, attempt=1, worker="gone", at=now())
    assert started is not None
    planned = sharding.plan(started, sharding.plan_pieces({"evalq_demo": 10}, 2), hold=True)
    assert planned is not None
    released = sharding.release(planned, 1, at=now())
    assert released is not None
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    await jobs.create(released)
    gateway.dispatcher.repair_after = 0.5
    js = nc.jetstream()

    async def published(index: int) -> Any:
        subject = topology.piece_subject("default", job_id, str(index))
        return await js.get_last_msg(topology.pieces_stream("default"), subject)

    for index in (0, 1):  # 0 by the repair, 1 by a release
        msg = await eventually(
            lambda i=index: published(i), timeout=15, retry_on=(NotFoundError,), what=f"piece {index}"
        )
        assert decode(msg.data, PieceItem) == PieceItem(job_id=job_id, step="piece", index=index)
    found = await jobs.get(job_id)
    assert found is not None and [p.status for p in found[0].pieces] == ["queued", "queued"]
    assert all(p.released_at for p in found[0].pieces)
