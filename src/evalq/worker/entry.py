"""The evaluation process's entry for every lmms-eval run evalq starts.

Run as `python -m evalq.worker.entry [--evalq_shard=MODE --evalq_shard_file=PATH]
[--evalq_journal=DIR [--evalq_rescore]] <lmms-eval flags>` (forked from the warm evaluator,
run in the resident process, or started fresh). Without `--evalq_shard` it runs lmms-eval on
the flags: a whole job. A sharded job runs three steps, each in its own evaluation process;
a configured `evaluator` command is given the same two flags first, so a stand-in can take
part in sharded jobs too.

- `plan`: counts each task's documents (lmms-eval builds the tasks, so groups,
  splits and `--limit` count as they will in the run) and writes `{task: count}` as JSON to PATH.
- `record`: runs lmms-eval on one piece (its tasks, `--offset`, `--limit`) and keeps every
  response the model gave, by (request type, task, document, index), and every score the
  task's `process_results` gave, by (task, document, filter, call), in PATH (one file per
  rank when accelerate runs several). A piece scores its own documents.
- `replay`: runs lmms-eval on the whole request, answering every model request from the
  pieces' responses (`PATH/<piece>/responses*.pkl`) instead of the model, and every
  `process_results` call from the pieces' scores instead of the task: the merge scores no
  document again, and a document with no recorded score ends the run with an error that
  names it. lmms-eval still filters the responses, aggregates, computes stderr and groups
  and writes the samples, with its own code, from exactly what an unsharded run has.

`--evalq_journal=DIR` journals a whole job or a piece (`record`): each response and each
score is written to DIR as the run goes, and those the job's earlier journal or the
response cache holds are taken back instead of computed (`journal_hooks.py`; the files are
`journal.py`'s). `--evalq_rescore` with it loads no model: every request is answered from
the journal's responses and every document scored again with the task's code of today.

The model never loads in `replay`: the class lmms-eval asks for is swapped for one that
only replays (it keeps the real class's name and whether it is a chat model, which decides
how tasks build their prompts). A response that is missing ends the run with an error.
How the model class is swapped or watched is `lmms_hooks.py`; this module runs the modes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import runpy
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .journal import safe_load
from .journal_hooks import journaling
from .lmms_hooks import Key, ScoreKey, patched_get_model, recording, replaying, scoring

__all__ = ["ENTRY_MODULE", "MODES", "RESPONSES_FILE", "Recorded", "load_responses", "main", "shard_flags"]

# This module, as the worker launches it.
ENTRY_MODULE = "evalq.worker.entry"
RESPONSES_FILE = "responses.pkl"
MODES = ("plan", "record", "replay")


def shard_flags(mode: str, path: str | Path) -> list[str]:
    """The two flags that make an evaluation one step of a sharded job."""
    return [f"--evalq_shard={mode}", f"--evalq_shard_file={path}"]


class Recorded:
    """What one piece (or one rank of it) recorded: the model's responses and the task's scores."""

    def __init__(self) -> None:
        self.responses: dict[Key, list[Any]] = defaultdict(list)
        self.scores: dict[ScoreKey, Any] = {}

    def dump(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            pickle.dump({"responses": dict(self.responses), "scores": self.scores}, handle, protocol=4)
        tmp.replace(path)

    def add(self, path: Path) -> None:
        """Add a recorded file's contents, read with the journal's allow-list unpickler."""
        loaded = safe_load(path)
        if not isinstance(loaded, dict) or not isinstance(loaded.get("responses"), dict):
            # An evalq before scores were kept wrote the responses alone: its pieces cannot be merged.
            raise ValueError(f"{path} holds no responses and scores (a piece recorded by an older evalq?)")
        if not isinstance(loaded.get("scores"), dict):
            raise ValueError(f"{path} holds no scores")
        for key, values in loaded["responses"].items():
            self.responses[key].extend(values)
        self.scores.update(loaded["scores"])


def load_responses(path: Path) -> Recorded:
    recorded = Recorded()
    recorded.add(path)
    return recorded


def _run_lmms_eval(argv: list[str]) -> None:
    sys.argv = ["lmms_eval", *argv]
    runpy.run_module("lmms_eval", run_name="__main__", alter_sys=True)


def _whole(journal_dir: Path, argv: list[str], *, rescore: bool) -> int:
    with journaling(journal_dir, rescore=rescore) as journal, journal.responses(), journal.scores():
        _run_lmms_eval(argv)
    return 0


def _record(responses_path: Path, argv: list[str], journal_dir: Path | None = None) -> int:
    kept = Recorded()

    def keep(key: ScoreKey, score: Any) -> Any:
        value = score()
        kept.scores[key] = value
        return value

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # one file per rank: each holds the responses of its own documents
        rank = int(os.environ.get("RANK", "0") or 0)
        responses_path = responses_path.with_name(f"{responses_path.stem}.rank{rank}{responses_path.suffix}")
    try:
        with contextlib.ExitStack() as stack:
            journal = stack.enter_context(journaling(journal_dir)) if journal_dir is not None else None
            # The piece keeps every answer and score, journaled or taken back from the
            # journal: its hooks wrap the journal's (the hook entered last is asked first).
            if journal is not None:
                stack.enter_context(journal.responses())
            stack.enter_context(recording(kept.responses))
            stack.enter_context(scoring(keep))
            if journal is not None:
                stack.enter_context(journal.scores())
            _run_lmms_eval(argv)
    finally:
        # Written even when the run failed: the worker reads success from the results file.
        kept.dump(responses_path)
    return 0


def _replay(responses_dir: Path, argv: list[str]) -> int:
    recorded = Recorded()
    for path in sorted(responses_dir.glob("*/responses*.pkl")):
        recorded.add(path)
    scores = recorded.scores

    def recorded_score(key: ScoreKey, score: Any) -> Any:
        if key not in scores:
            task, doc_id, filter_key, call = key
            raise RuntimeError(
                f"no recorded score for task {task} document {doc_id} (filter {filter_key}, call {call}); "
                "the merge never scores a document itself"
            )
        return scores[key]

    with patched_get_model(replaying(recorded.responses)), scoring(recorded_score):
        _run_lmms_eval(argv)
    return 0


def _plan(out: Path, argv: list[str]) -> int:
    from lmms_eval.evaluator_utils import get_sample_size, get_task_list
    from lmms_eval.tasks import TaskManager, get_task_dict

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--include_path", default=None)
    parser.add_argument("--limit", type=float, default=None)
    known, _ = parser.parse_known_args(argv)
    manager = TaskManager("ERROR", include_path=known.include_path, model_name=known.model)
    # The tasks in the order lmms-eval's own run builds them: its command line sorts the
    # names it matches, and `get_task_dict` may reorder them again (it reverses them).
    asked = known.tasks.split(",")
    names = manager.match_tasks(asked)
    missing = [name for name in asked if name not in names and "*" not in name]
    if missing:
        raise ValueError(f"tasks not found: {', '.join(missing)}")
    counts: dict[str, int] = {}
    # lmms-eval's `evaluate` replaces its `limit` with each task's count as it builds the
    # tasks, so a fraction becomes ceil(documents * fraction) of the first task it builds,
    # and that count is then the limit of every task after it. The pieces must hold exactly
    # the documents that run asks for, so the same walk counts them here.
    limit: float | int | None = known.limit
    for output in get_task_list(get_task_dict(names, manager)):
        task = output.task
        if task is None:  # a group's own entry
            continue
        limit = get_sample_size(task, limit)
        docs = len(task.eval_docs)
        # A limit of 0 (a first task with no documents) reads as none at all, as lmms-eval reads it.
        counts[str(output.task_name)] = min(docs, int(limit)) if limit else docs
    out.write_text(json.dumps(counts))
    print(f"planned: {json.dumps(counts)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY_MODULE}", add_help=False, allow_abbrev=False)
    parser.add_argument("--evalq_shard", choices=MODES, default=None)
    parser.add_argument("--evalq_shard_file", type=Path, default=None)
    parser.add_argument("--evalq_journal", type=Path, default=None)
    parser.add_argument("--evalq_rescore", action="store_true")
    options, theirs = parser.parse_known_args(args)
    journal: Path | None = options.evalq_journal
    if options.evalq_rescore and (journal is None or options.evalq_shard is not None):
        parser.error("--evalq_rescore goes with --evalq_journal, on a whole job")
    if journal is not None and options.evalq_shard not in (None, "record"):
        parser.error("--evalq_journal goes with a whole job or a piece (record)")
    if options.evalq_shard is None:
        if journal is not None:
            return _whole(journal, theirs, rescore=options.evalq_rescore)
        _run_lmms_eval(theirs)
        return 0
    if options.evalq_shard_file is None:
        parser.error("--evalq_shard needs --evalq_shard_file")
    path: Path = options.evalq_shard_file
    if options.evalq_shard == "plan":
        return _plan(path, theirs)
    if options.evalq_shard == "record":
        return _record(path, theirs, journal)
    return _replay(path, theirs)


if __name__ == "__main__":
    sys.exit(main())
