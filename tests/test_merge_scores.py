"""A sharded job's merge never scores a document: each piece scores its own documents with
the task's `process_results`, records the scores with its responses, and the merge hands
lmms-eval those scores."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evalq import AsyncClient
from evalq.worker.entry import ENTRY_MODULE, RESPONSES_FILE, load_responses, shard_flags
from evalq.worker.taskpaths import build_include_dir

from .scored_task import CALLS_VARIABLE, TASK, counting_task
from .test_sharding import _assert_same_run


@pytest.mark.slow
async def test_the_pieces_score_each_document_once_and_the_merge_none(
    client: AsyncClient, worker_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls.txt"
    calls.touch()
    monkeypatch.setenv(CALLS_VARIABLE, str(calls))
    tasks = str(counting_task(tmp_path / "tasks"))
    for _ in range(2):
        await worker_factory(task_paths=[tasks])
    job = {"model": "dummy", "tasks": [TASK], "limit": 60}
    whole = await client.submit_and_wait(**job, timeout=300)
    sharded = await client.submit_and_wait(**job, shards=2, timeout=300)
    assert whole.status == sharded.status == "completed", (whole.error, sharded.error)
    assert sharded.shards == 2 and sorted(p.docs for p in sharded.pieces) == [30, 30]

    lines = calls.read_text().splitlines()
    whole_calls = [line for line in lines if whole.job_id in line]
    sharded_calls = [line for line in lines if sharded.job_id in line]
    assert len(whole_calls) == 60, "the unsharded run scores each document once"
    in_pieces = [line for line in sharded_calls if "/shards/" in line]
    assert len(sharded_calls) == 60, f"the sharded job scored {len(sharded_calls)} times for 60 documents"
    assert len(in_pieces) == 60, f"the merge scored {len(sharded_calls) - len(in_pieces)} documents"
    assert {line.rsplit("/shards/", 1)[1] for line in in_pieces} == {"0", "1"}

    await _assert_same_run(client, whole, sharded, tmp_path)


def test_recorded_scores_load_as_they_were_kept_and_a_planted_class_does_not(tmp_path: Path) -> None:
    scores = {
        ("t", 0, "none", 0): {"exact_match": np.float64(1.0), "macro_f1": ("A", "B"), "extra": [1, {"k": "v"}]},
        ("t", 1, "none", 0): {"vector": np.arange(3.0)},
    }
    kept = tmp_path / "responses.pkl"
    kept.write_bytes(pickle.dumps({"responses": {("generate_until", "t", 0, 0): ["A"]}, "scores": scores}))
    loaded = load_responses(kept)
    assert loaded.responses == {("generate_until", "t", 0, 0): ["A"]}
    first = loaded.scores[("t", 0, "none", 0)]
    assert first["macro_f1"] == ("A", "B") and type(first["macro_f1"]) is tuple
    assert first["exact_match"] == 1.0 and first["extra"] == [1, {"k": "v"}]
    assert list(loaded.scores[("t", 1, "none", 0)]["vector"]) == [0.0, 1.0, 2.0]

    planted = tmp_path / "planted.pkl"
    planted.write_bytes(pickle.dumps({"responses": {}, "scores": {("t", 0, "none", 0): Path("/")}}))
    with pytest.raises(pickle.UnpicklingError, match="pathlib"):
        load_responses(planted)
    older = tmp_path / "older.pkl"
    older.write_bytes(pickle.dumps({("generate_until", "t", 0, 0): ["A"]}))
    with pytest.raises(ValueError, match="holds no responses"):
        load_responses(older)


def _shard_step(mode: str, path: Path, output: Path, include: Path) -> subprocess.CompletedProcess[str]:
    """One step of a sharded job, as the worker launches it, on evalq_demo's first 4 documents."""
    flags = ["--model=dummy", "--tasks=evalq_demo", "--limit=4", f"--output_path={output}", f"--include_path={include}"]
    argv = [sys.executable, "-m", ENTRY_MODULE, *shard_flags(mode, path), *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=output.parent, check=False)


@pytest.mark.slow
def test_a_merge_without_a_documents_score_fails_naming_it(tmp_path: Path) -> None:
    include = build_include_dir(tmp_path / "include", [])
    recorded = tmp_path / "responses" / "0" / RESPONSES_FILE
    recorded.parent.mkdir(parents=True)
    piece = _shard_step("record", recorded, tmp_path / "piece", include)
    assert recorded.is_file(), piece.stderr[-2000:]
    kept = load_responses(recorded)
    assert sorted(kept.scores) == [("evalq_demo", doc, "none", 0) for doc in range(4)]

    merged = _shard_step("replay", tmp_path / "responses", tmp_path / "merge", include)
    assert list((tmp_path / "merge").rglob("*_results.json")), merged.stderr[-2000:]

    del kept.scores[("evalq_demo", 2, "none", 0)]
    kept.dump(recorded)
    missing = _shard_step("replay", tmp_path / "responses", tmp_path / "missing", include)
    assert "no recorded score for task evalq_demo document 2" in missing.stderr + missing.stdout
    assert not list((tmp_path / "missing").rglob("*_results.json")), "a merge with a score missing wrote results"
