"""The journal of a real lmms-eval run, from inside its evaluation process: every response
and score written as the run goes, and taken back by a resume, a response cache and a
re-score; a kill loses at most one flush window, a SIGTERM nothing."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from evalq.worker.entry import ENTRY_MODULE, RESPONSES_FILE, load_responses, shard_flags
from evalq.worker.journal import (
    CACHE_FILE,
    COUNTS_FILE,
    JOURNAL_FILE,
    RESUME_FILE,
    SETTINGS_FILE,
    Record,
    cache_from,
    read_frames,
    resume_from,
)
from evalq.worker.resident import MAX_MESSAGE, Done, ResidentRun, decode, encode

from .conftest import OFFLINE
from .scored_task import CALLS_VARIABLE, SLEEP_VARIABLE, TASK, calls, counting_task
from .waiting import eventually_sync

DOCS = 60
SAMPLE_KEYS = ("doc_id", "target", "resps", "filtered_resps", "exact_match", "macro_f1")


@dataclass
class Run:
    """One evaluation: its folder, its journal folder, its output and its calls file."""

    root: Path

    @property
    def journal(self) -> Path:
        return self.root / "journal"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def calls(self) -> Path:
        return self.root / "calls.txt"

    def records(self) -> list[Record]:
        frames, _ = read_frames(self.journal / JOURNAL_FILE)
        return [record for frame in frames for record in frame]

    def counts(self) -> dict[str, Any]:
        return json.loads((self.journal / COUNTS_FILE).read_text())  # type: ignore[no-any-return]

    def results(self) -> dict[str, Any]:
        found = list(self.output.rglob("*_results.json"))
        assert len(found) == 1, f"results files {found} in {self.output}; log:\n{self.log()[-3000:]}"
        return json.loads(found[0].read_text())  # type: ignore[no-any-return]

    def samples(self) -> list[dict[str, Any]]:
        path = next(self.output.rglob(f"*_samples_{TASK}.jsonl"))
        lines = path.read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k in SAMPLE_KEYS} for line in lines]

    def log(self) -> str:
        path = self.root / "log.txt"
        return path.read_text(errors="replace") if path.exists() else ""


def _prepare(root: Path, settings: dict[str, Any] | None = None, *, resume: Any = None, cache: Any = None) -> Run:
    """A run's journal folder with the files the worker writes before it."""
    run = Run(root)
    run.journal.mkdir(parents=True)
    if settings is not None:
        (run.journal / SETTINGS_FILE).write_text(json.dumps(settings))
    for name, value in ((RESUME_FILE, resume), (CACHE_FILE, cache)):
        if value is not None:
            (run.journal / name).write_bytes(pickle.dumps(value, protocol=4))
    return run


def _env(run: Run, **extra: str) -> dict[str, str]:
    return {**os.environ, **OFFLINE, CALLS_VARIABLE: str(run.calls), **extra}


def _argv(run: Run, tasks: Path, *flags: str, module: str = ENTRY_MODULE, limit: int = DOCS) -> list[str]:
    """The command line of a journaled run (or of plain lmms-eval); `flags` replace the defaults they name."""
    lmms_eval_flags = [
        "--model=dummy",
        f"--tasks={TASK}",
        f"--limit={limit}",
        f"--include_path={tasks}",
        f"--output_path={run.output}",
        "--log_samples",
    ]
    given = {flag.split("=", 1)[0] for flag in flags}
    ours = [flag for flag in lmms_eval_flags if flag.split("=", 1)[0] not in given]
    journal = [f"--evalq_journal={run.journal}"] if module == ENTRY_MODULE else []
    return [sys.executable, "-m", module, *journal, *ours, *flags]


def _evaluate(run: Run, tasks: Path, *flags: str, module: str = ENTRY_MODULE, limit: int = DOCS) -> Run:
    """Run the evaluation to its end, its output in the run's log."""
    with open(run.root / "log.txt", "wb") as log:
        subprocess.run(
            _argv(run, tasks, *flags, module=module, limit=limit),
            env=_env(run),
            cwd=run.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    return run


def _responses(records: list[Record]) -> list[Record]:
    return [record for record in records if record[0] == "response"]


def _scores(records: list[Record]) -> list[Record]:
    return [record for record in records if record[0] == "score"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return counting_task(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def first(tasks: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A whole journaled run of the task's first 60 documents, flushing every 16 records."""
    run = _prepare(tmp_path_factory.mktemp("first"), {"flush_count": 16, "chunk": 8})
    return _evaluate(run, tasks)


@pytest.mark.slow
def test_a_whole_run_journals_each_response_and_score_once_and_gives_lmms_evals_results(
    first: Run, tasks: Path, tmp_path: Path
) -> None:
    records = first.records()
    responses, scores = _responses(records), _scores(records)
    assert sorted(r[1] for r in responses) == [("generate_until", TASK, doc, 0) for doc in range(DOCS)]
    assert all(isinstance(r[2], str) and len(r[2]) == 64 and r[3] == 0 for r in responses), responses[0]
    assert all(r[5] is True for r in responses), "greedy generations are cacheable"
    assert len({r[2] for r in responses}) == DOCS, "each document's prompt has its own fingerprint"
    assert sorted(r[1] for r in scores) == [(TASK, doc, "none", 0) for doc in range(DOCS)]
    assert first.counts() == {
        "responses_computed": DOCS,
        "responses_resumed": 0,
        "responses_reused": 0,
        "scores_computed": DOCS,
        "scores_reused": 0,
        "model_loaded": True,
    }
    assert calls(first.calls) == DOCS
    # The model answered 8 requests at a time, and the progress was evalq's own line.
    log = first.log()
    assert "[evalq progress] Model Responding:   0%|          | 0/60" in log
    assert "[evalq progress] Model Responding:  13%|#         | 8/60" in log
    assert "[evalq progress] Model Responding: 100%|##########| 60/60\n[evalq progress] end" in log

    plain = _evaluate(Run(tmp_path), tasks, module="lmms_eval")
    assert first.results()["results"] == plain.results()["results"]
    assert first.samples() == plain.samples()


@pytest.mark.slow
def test_a_resume_takes_back_the_journaled_half_and_computes_the_rest(first: Run, tasks: Path, tmp_path: Path) -> None:
    records = first.records()
    kept = [r for r in records if r[1][2 if r[0] == "response" else 1] < DOCS // 2]
    resume = resume_from(kept)
    assert len(resume["responses"]) == len(resume["scores"]) == DOCS // 2
    second = _evaluate(_prepare(tmp_path, {"chunk": 8}, resume=resume), tasks)

    assert second.counts() == {
        "responses_computed": DOCS // 2,
        "responses_resumed": DOCS // 2,
        "responses_reused": 0,
        "scores_computed": DOCS // 2,
        "scores_reused": DOCS // 2,
        "model_loaded": True,
    }
    assert calls(second.calls) == DOCS // 2, "the task scored only the documents the journal did not hold"
    again = second.records()
    assert sorted(r[1][2] for r in _responses(again)) == list(range(DOCS // 2, DOCS)), "taken back, not written again"
    assert sorted(r[1][1] for r in _scores(again)) == list(range(DOCS // 2, DOCS))
    assert "[evalq progress] Model Responding:  50%|#####     | 30/60" in second.log()
    assert second.results()["results"] == first.results()["results"]
    assert second.samples() == first.samples()


@pytest.mark.slow
def test_a_piece_journals_too_and_still_records_every_answer_and_score(first: Run, tasks: Path, tmp_path: Path) -> None:
    resume = resume_from([r for r in first.records() if r[1][2 if r[0] == "response" else 1] < DOCS // 2])
    piece = _prepare(tmp_path / "piece", {"chunk": 8}, resume=resume)
    recorded = tmp_path / RESPONSES_FILE
    _evaluate(piece, tasks, *shard_flags("record", recorded))

    kept = load_responses(recorded)
    assert sorted(kept.responses) == [("generate_until", TASK, doc, 0) for doc in range(DOCS)], piece.log()[-3000:]
    assert sorted(kept.scores) == [(TASK, doc, "none", 0) for doc in range(DOCS)]
    assert calls(piece.calls) == DOCS // 2
    counts = piece.counts()
    assert (counts["responses_resumed"], counts["scores_reused"], counts["scores_computed"]) == (30, 30, 30)
    assert sorted(r[1][2] for r in _responses(piece.records())) == list(range(DOCS // 2, DOCS))


@pytest.mark.slow
def test_cached_answers_are_reused_and_sampled_ones_are_cached_only_under_a_seed(
    first: Run, tasks: Path, tmp_path: Path
) -> None:
    cache = cache_from(first.records())
    assert len(cache) == DOCS
    reusing = _evaluate(_prepare(tmp_path / "reusing", cache=cache), tasks)
    counts = reusing.counts()
    assert (counts["responses_computed"], counts["responses_reused"], counts["scores_computed"]) == (0, DOCS, DOCS)
    # Reused answers are journaled: the job's own journal holds every answer it used.
    assert sorted(r[1][2] for r in _responses(reusing.records())) == list(range(DOCS))
    assert reusing.results()["results"] == first.results()["results"]

    sampling = "--gen_kwargs=temperature=0.7,do_sample=True"
    unseeded = _evaluate(_prepare(tmp_path / "unseeded", cache=cache), tasks, sampling, limit=8)
    assert unseeded.counts()["responses_computed"] == 8, "a sampled request's fingerprint differs from a greedy one's"
    assert [r[5] for r in _responses(unseeded.records())] == [False] * 8
    assert cache_from(unseeded.records()) == {}
    seeded = _evaluate(_prepare(tmp_path / "seeded", {"seed": True}), tasks, sampling, limit=8)
    assert [r[5] for r in _responses(seeded.records())] == [True] * 8


_CHANGED_SCORING = """

def _scored(doc, results):
    return {"exact_match": 1.0, "macro_f1": (str(doc["answer"]), str(doc["answer"]))}
"""


@pytest.mark.slow
def test_a_rescore_loads_no_model_and_scores_every_document_with_todays_task(
    first: Run, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    changed = counting_task(tmp_path_factory.mktemp("changed"))
    with open(changed / TASK / "utils.py", "a") as handle:
        handle.write(_CHANGED_SCORING)
    resume = resume_from(first.records())
    # A model that cannot be built (no such checkpoint), and a chat model, whose prompts are
    # messages: each request is answered by its key, and the prompts' change is reported.
    unloadable = ["--model=huggingface", "--model_args=pretrained=/nonexistent/model"]
    rescored = _evaluate(_prepare(tmp_path / "rescored", resume=resume), changed, "--evalq_rescore", *unloadable)

    assert rescored.counts() == {
        "responses_computed": 0,
        "responses_resumed": DOCS,
        "responses_reused": 0,
        "scores_computed": DOCS,
        "scores_reused": 0,
        "model_loaded": False,
    }
    assert calls(rescored.calls) == DOCS, "every document is scored again, none taken from the journal"
    assert f"[evalq rescore] {DOCS} of {DOCS} responses answered another prompt" in rescored.log()
    assert _responses(rescored.records()) == []
    assert len(_scores(rescored.records())) == DOCS
    before, after = first.results()["results"][TASK], rescored.results()["results"][TASK]
    assert before["exact_match,none"] < 1.0 and after["exact_match,none"] == 1.0
    assert after["macro_f1,none"] == 1.0 != before["macro_f1,none"]
    assert [s["filtered_resps"] for s in rescored.samples()] == [s["filtered_resps"] for s in first.samples()]

    del resume["responses"][next(k for k in resume["responses"] if k[0][2] == 7)]
    missing = _evaluate(_prepare(tmp_path / "missing", resume=resume), changed, "--evalq_rescore")
    assert f"no journaled response for ('generate_until', '{TASK}', 7, 0) (answer 1)" in missing.log()
    assert not list(missing.output.rglob("*_results.json"))


@pytest.mark.slow
def test_a_kill_loses_at_most_one_flush_window_and_leaves_only_complete_frames(tasks: Path, tmp_path: Path) -> None:
    flush_count = 4
    run = _prepare(tmp_path, {"flush_count": flush_count, "flush_seconds": 600, "chunk": 8})
    with open(run.root / "log.txt", "wb") as log:
        process = subprocess.Popen(
            _argv(run, tasks),
            env=_env(run, **{SLEEP_VARIABLE: "0.1"}),
            cwd=run.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            eventually_sync(lambda: calls(run.calls), until=lambda n: n > DOCS // 2, timeout=120, interval=0.02)
        finally:
            process.kill()
            process.wait(timeout=30)
    scored = calls(run.calls)
    assert scored < DOCS, "the run ended before the kill"

    frames, offset = read_frames(run.journal / JOURNAL_FILE)
    assert offset <= (run.journal / JOURNAL_FILE).stat().st_size
    records = [record for frame in frames for record in frame]
    assert len(_responses(records)) == DOCS, "every chunk's answers were flushed before scoring began"
    # Lost: what waited for the next frame, and the scores lmms-eval's 4 threads had made
    # but not yet handed to the journal.
    assert len(_scores(records)) >= scored - (flush_count - 1) - 4, (len(_scores(records)), scored)
    counted = json.loads((run.journal / COUNTS_FILE).read_text())
    assert counted["scores_computed"] <= len(_scores(records))


def _resident_job(control: socket.socket, run: Run, argv: list[str]) -> None:
    """Hand the resident process a job, its output going to the run's log."""
    with open(run.root / "log.txt", "ab") as out:
        socket.send_fds(
            control, [encode(ResidentRun(module=ENTRY_MODULE, argv=argv, cwd=str(run.root)))], [out.fileno()]
        )


@pytest.mark.slow
def test_a_resident_job_stopped_by_sigterm_flushes_its_journal_first(tasks: Path, tmp_path: Path) -> None:
    """The resident process runs jobs in its main thread, one after another: a cancel's
    SIGTERM reaches the running job's handler, and the job before it left none behind."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    first = _prepare(tmp_path / "first", {"flush_count": 1000, "flush_seconds": 600})
    stopped = _prepare(tmp_path / "stopped", {"flush_count": 1000, "flush_seconds": 600})
    # The process's environment is the jobs' too: one calls file, and a slow task for both.
    resident = subprocess.Popen(
        [sys.executable, "-m", "evalq.worker.resident_process", f"--control-fd={theirs.fileno()}"],
        pass_fds=[theirs.fileno()],
        env=_env(first, **{SLEEP_VARIABLE: "0.1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        _resident_job(ours, first, _argv(first, tasks, limit=8)[3:])
        replies = [decode(ours.recv(MAX_MESSAGE)) for _ in range(2)]
        assert replies[-1] == Done(code=0), first.log()[-3000:]
        assert first.counts()["scores_computed"] == 8 and len(_scores(first.records())) == 8

        _resident_job(ours, stopped, _argv(stopped, tasks)[3:])
        eventually_sync(lambda: calls(first.calls), until=lambda n: n > 8 + DOCS // 2, timeout=120, interval=0.02)
        resident.send_signal(signal.SIGTERM)
        assert resident.wait(timeout=30) == -signal.SIGTERM, "the process ends as SIGTERM ends it"
    finally:
        if resident.poll() is None:
            resident.kill()
            resident.wait()
        ours.close()
    scored = calls(first.calls) - 8
    records = stopped.records()
    # Nothing that waited is lost: only the scores lmms-eval's 4 threads had not handed over yet.
    assert scored - 4 <= len(_scores(records)) <= scored, (len(_scores(records)), scored)
    assert len(_responses(records)) == DOCS
    assert stopped.counts()["scores_computed"] == len(_scores(records))
    assert len(_scores(first.records())) == 8, "the first job's journal was closed with its job"
