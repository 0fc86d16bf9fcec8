"""One job can never take over another job's results: each job's folder is its own, made
empty for each attempt, and results are read only from it."""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient, InvalidField
from evalq.config import Settings
from evalq.schemas import TERMINAL, Failed
from evalq.topology import Topology
from evalq.worker.results import collect

from .events import all_events
from .jobs import FAKE, JOB, enqueue_unchecked
from .waiting import eventually

VICTIM_LIKE = "0b3e9a8e-1111-4222-8333-123456789abc"


def write(path: Path, text: str = '{"results": {"t": {"acc,none": 1.0}}}') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_results_are_read_only_from_the_jobs_own_two_levels(tmp_path: Path) -> None:
    own = write(tmp_path / "model" / "20260101_000000_results.json")
    sample = write(tmp_path / "model" / "20260101_000000_samples_t.jsonl", "{}\n")
    write(tmp_path / "model" / "19990101_000000_samples_t.jsonl", "{}\n")  # another run's samples
    # What a job nested inside this one would write: never read.
    write(tmp_path / VICTIM_LIKE / "20270101_000000_results.json")
    write(tmp_path / "model" / "deeper" / "20270101_000000_results.json")
    found = collect(tmp_path)
    assert (found.results, found.samples) == (own, [sample])


def test_two_results_files_or_an_old_one_are_no_result(tmp_path: Path) -> None:
    write(tmp_path / "a" / "1_results.json")
    write(tmp_path / "b" / "2_results.json")
    found = collect(tmp_path)
    assert found.results is None and "more than one results file" in found.problem
    other = tmp_path / "old"
    stale = write(other / "m" / "0_results.json")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    found = collect(other, since=time.time())
    assert found.results is None and "predates this run" in found.problem


async def test_output_dir_naming_another_job_is_refused(client: AsyncClient, topology: Topology, nc: Any) -> None:
    victim = await client.submit(**JOB)
    for output_dir in (victim.job_id, f"runs/{victim.job_id}", f"{victim.job_id.upper()}/x"):
        with pytest.raises(InvalidField) as refused:
            await client.submit(**JOB, output_dir=output_dir)
        assert refused.value.path == "$.output_dir"
    stored = (await nc.jetstream().stream_info(f"KV_{topology.jobs_bucket}")).state.messages  # a record per job
    assert stored == 1, "a refused job was enqueued"


@pytest.mark.slow
async def test_a_crashed_job_is_failed_with_its_own_log_whatever_was_queued_beside_it(
    client: AsyncClient,
    settings: Settings,
    topology: Topology,
    nc: Any,
    worker_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The attack: the victim crashes, and a job whose folder would sit inside the victim's
    writes a results file there. The gateway refuses such a job now, so it arrives here as a
    work message from before that rule, with its record: the worker refuses it too."""
    monkeypatch.setenv("FAKE_EVAL_MODE", "fail")
    victim = await client.submit(**JOB)
    attacker_id = await enqueue_unchecked(nc, topology, {**JOB, "output_dir": victim.job_id})
    await worker_factory(evaluator=FAKE)
    finals = {}
    for job in (victim.job_id, attacker_id):
        finals[job] = await eventually(
            partial(client.get_job, job),
            until=lambda info: info.status in TERMINAL,
            timeout=120,
            what=f"job {job} to end",
            interval=0.2,
        )
    victim_final = finals[victim.job_id]
    assert victim_final.status == "failed" and victim_final.result is None
    assert "no *_results.json" in (victim_final.error or "")
    failed = [e for e in await all_events(client, victim.job_id) if isinstance(e, Failed)]
    assert len(failed) == 1 and "the fake evaluation broke" in (failed[0].log_tail or "")
    attacker_final = finals[attacker_id]
    assert attacker_final.status == "failed" and "output_dir" in (attacker_final.error or "")
    assert attacker_final.request is None, "a stored request that fails today's rules reads as none"
    victim_dir = settings.results_root / victim.job_id
    assert victim_dir.is_dir() and not any(p.is_dir() for p in victim_dir.iterdir()), (
        "a folder was nested in the victim's"
    )
