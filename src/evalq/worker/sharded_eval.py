"""The three lmms-eval runs of a sharded job, each in its own evaluation process.

Run as `python -m evalq.worker.sharded_eval --evalq_shard=MODE --evalq_shard_file=PATH
<lmms-eval flags>` (forked from the warm evaluator, or started fresh, like any evaluation).
A configured `evaluator` command is given the same two flags first, so a stand-in can
take part in sharded jobs too.

- `plan`: counts each task's documents (lmms-eval builds the tasks, so groups,
  splits and `--limit` count as they will in the run) and writes `{task: count}` as JSON to PATH.
- `record`: runs lmms-eval on one piece (its tasks, `--offset`, `--limit`)
  and keeps every response the model gave, by (request type, task, document, index), in
  PATH (one file per rank when accelerate runs several).
- `replay`: runs lmms-eval on the whole request, answering every model request from the
  pieces' responses (`PATH/<piece>/responses*.pkl`) instead of the model. lmms-eval computes
  every metric, stderr, group and sample file, exactly as an unsharded run does: the
  responses are the same, and so is everything computed from them.

The model never loads in `replay`: the class lmms-eval asks for is swapped for one that
only replays (it keeps the real class's name and whether it is a chat model, which decides
how tasks build their prompts). A response that is missing ends the run with an error.
How the model class is swapped or watched is `lmms_hooks.py`; this module runs the modes.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import runpy
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .lmms_hooks import Key, patched_get_model, recording, replaying

__all__ = ["MODES", "RESPONSES_FILE", "SHARDED_MODULE", "load_responses", "main", "shard_flags"]

# This module, as the worker launches it.
SHARDED_MODULE = "evalq.worker.sharded_eval"
RESPONSES_FILE = "responses.pkl"
MODES = ("plan", "record", "replay")


def shard_flags(mode: str, path: str | Path) -> list[str]:
    """The two flags that make an evaluation one step of a sharded job."""
    return [f"--evalq_shard={mode}", f"--evalq_shard_file={path}"]


class _SafeUnpickler(pickle.Unpickler):
    """Responses are plain values (strings, numbers, tuples, lmms-eval's `GenerationResult`);
    any other class is refused, so a planted file cannot run code."""

    _ALLOWED = {
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # What lmms-eval's own models return from generate_until: plain dataclasses of data.
        ("lmms_eval.api.instance", "GenerationResult"),
        ("lmms_eval.api.instance", "TokenCounts"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a response of type {module}.{name} is not replayed")


def load_responses(path: Path) -> dict[Key, list[Any]]:
    with open(path, "rb") as handle:
        loaded = _SafeUnpickler(handle).load()
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds no responses")
    return loaded


def _run_lmms_eval(argv: list[str]) -> None:
    sys.argv = ["lmms_eval", *argv]
    runpy.run_module("lmms_eval", run_name="__main__", alter_sys=True)


def _record(responses_path: Path, argv: list[str]) -> int:
    kept: dict[Key, list[Any]] = defaultdict(list)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:  # one file per rank: each holds the responses of its own documents
        rank = int(os.environ.get("RANK", "0") or 0)
        responses_path = responses_path.with_name(f"{responses_path.stem}.rank{rank}{responses_path.suffix}")
    try:
        with recording(kept):
            _run_lmms_eval(argv)
    finally:
        # Written even when the run failed: the worker reads success from the results file.
        tmp = responses_path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            pickle.dump(dict(kept), handle, protocol=4)
        tmp.replace(responses_path)
    return 0


def _replay(responses_dir: Path, argv: list[str]) -> int:
    answers: dict[Key, list[Any]] = {}
    for path in sorted(responses_dir.glob("*/responses*.pkl")):
        for key, values in load_responses(path).items():
            answers.setdefault(key, []).extend(values)
    with patched_get_model(replaying(answers)):
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
    parser = argparse.ArgumentParser(prog="python -m evalq.worker.sharded_eval", add_help=False)
    parser.add_argument("--evalq_shard", choices=MODES, required=True)
    parser.add_argument("--evalq_shard_file", type=Path, required=True)
    options, theirs = parser.parse_known_args(args)
    path: Path = options.evalq_shard_file
    if options.evalq_shard == "plan":
        return _plan(path, theirs)
    if options.evalq_shard == "record":
        return _record(path, theirs)
    return _replay(path, theirs)


if __name__ == "__main__":
    sys.exit(main())
