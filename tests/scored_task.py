"""A team's task folder whose scoring is watched: evalq_shard_demo (exact match and a
macro-F1 over tuples) under another name, whose `process_results` adds one line to the
file named by `CALLS_VARIABLE` for every call (the folder it ran in), after sleeping
`SLEEP_VARIABLE` seconds when that is set."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

TASK = "scored_demo"
CALLS_VARIABLE = "SCORE_CALLS_FILE"
SLEEP_VARIABLE = "SCORE_SLEEP_SECONDS"

# The folder a call ran in is the piece's own folder (`<job>/shards/<index>`) or, for the
# merge and unsharded runs, the job's.
_COUNTING = f'''

import os as _os
import time as _time

_scored = process_results


def process_results(doc, results):
    _time.sleep(float(_os.environ.get("{SLEEP_VARIABLE}") or 0))
    with open(_os.environ["{CALLS_VARIABLE}"], "a") as handle:
        handle.write(_os.getcwd() + "\\n")
    return _scored(doc, results)
'''


def counting_task(root: Path) -> Path:
    """The task folder under `root` (returned), as a team would configure it."""
    source = Path(str(resources.files("evalq") / "tasks" / "evalq_shard_demo"))
    folder = root / TASK
    folder.mkdir(parents=True)
    shutil.copyfile(source / "evalq_shard_demo.jsonl", folder / f"{TASK}.jsonl")
    (folder / "utils.py").write_text((source / "utils.py").read_text() + _COUNTING)
    template = (source / "evalq_shard_demo.yaml.in").read_text().replace("task: evalq_shard_demo", f"task: {TASK}")
    (folder / f"{TASK}.yaml").write_text(template.replace("@DATA_FILE@", str(folder / f"{TASK}.jsonl")))
    return root


def calls(path: Path) -> int:
    """How many times the task scored a document, by its calls file."""
    return len(path.read_text().splitlines()) if path.exists() else 0
