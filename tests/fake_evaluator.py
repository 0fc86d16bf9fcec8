"""A stand-in for `python -m lmms_eval`, for tests of the queue's machinery.

It honours the same argv (`--tasks`, `--output_path`, `--limit`), prints tqdm-like
progress and writes a valid `*_results.json`. FAKE_EVAL_MODE picks a behaviour:
`ok` (default), `slow` (runs until killed), `fail` (exits 0 with no results, as
lmms-eval does), `poison` (kills the worker that started it),
`big` (also writes a 40 MB samples file), `hostile` (fails like `fail`, its progress
phase and last lines full of terminal escapes, control characters and rich markup).
A `score=X` in `--model_args` makes X the metric's value (default 0.6), `stderr=Y` adds its
`exact_match_stderr`, and `samples=N` writes N samples per task as lmms-eval logs them
(`<date>_samples_<task>.jsonl`; the first carries an inline image).

The steps of a sharded job (`--evalq_shard=plan|record|replay`) are honoured too: `plan`
counts `--limit` documents per task, `record` runs as above (or sleeps FAKE_PIECE_SECONDS,
with no CPU, when set) and writes an empty responses file, `replay` writes results at once.
FAKE_FAIL_OFFSET makes the piece at that `--offset` fail like `fail`.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import time
from pathlib import Path

# What a job's output may hold, and a terminal must never be handed as it is: an OSC title
# (survives the CSI stripping of the log tail), a BEL, a NUL, a C1 CSI, a full reset, and
# text that rich would read as markup.
# A 1x1 PNG, as lmms-eval logs an image of a document inline.
TINY_PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
HOSTILE = "\x1b]0;pwned\x07 [bold red]not markup[/bold red] \x00 \x9b2J \x1bc end"


def arg(name: str, default: str = "") -> str:
    for item in sys.argv[1:]:
        if item.startswith(f"--{name}="):
            return item.split("=", 1)[1]
    return default


def write_results(output: Path, tasks: list[str]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    model_args = dict(item.partition("=")[::2] for item in arg("model_args").split(",") if "=" in item)
    score = float(model_args.get("score", "0.6"))
    row: dict[str, object] = {"exact_match,none": score}
    if "stderr" in model_args:
        row["exact_match_stderr,none"] = float(model_args["stderr"])
    results = {"results": {task: {"alias": task, **row} for task in tasks}, "lmms_eval_version": "fake"}
    (output / "19700101_000000_results.json").write_text(json.dumps(results))
    for task in tasks:
        lines = []
        for doc_id in range(int(model_args.get("samples", "0"))):
            sample: dict[str, object] = {
                "doc_id": doc_id,
                "target": f"answer {doc_id}",
                "filtered_resps": [f"output {doc_id}"],
                "input": f"question {doc_id}",
                "exact_match": float(doc_id % 2),
            }
            if doc_id == 0:
                sample["input_media"] = [TINY_PNG]
            lines.append(json.dumps(sample) + "\n")
        if lines:
            (output / f"19700101_000000_samples_{task}.jsonl").write_text("".join(lines))


def main() -> None:
    mode = os.environ.get("FAKE_EVAL_MODE", "ok")
    tasks = arg("tasks", "fake").split(",")
    output = Path(arg("output_path", "."))
    total = int(float(arg("limit", "5")))
    step, step_file = arg("evalq_shard"), arg("evalq_shard_file")
    if step == "plan":
        Path(step_file).write_text(json.dumps({task: total for task in tasks}))
        return
    if step == "replay":
        write_results(output, tasks)
        return
    if step == "record":
        Path(step_file).write_bytes(pickle.dumps({}))
        if arg("offset") and arg("offset") == os.environ.get("FAKE_FAIL_OFFSET"):
            mode = "fail"
        if os.environ.get("FAKE_PIECE_SECONDS"):
            time.sleep(float(os.environ["FAKE_PIECE_SECONDS"]))  # the piece's fixed duration itself
            write_results(output, tasks)
            return
    sys.stderr.write(f"fake evaluator pid {os.getpid()} argv {json.dumps(sys.argv[1:])}\n")
    if mode == "poison":
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)
        return
    steps = total if mode != "slow" else 10**6
    phase = "\x1b]0;phase\x07[blink]Responding" if mode == "hostile" else "Model Responding"
    for done in range(steps + 1):
        shown = min(done, total)
        pct = int(100 * shown / total) if total else 100
        sys.stderr.write(f"\r{phase}: {pct:3d}%|{'#' * (pct // 10):<10}| {shown}/{total} [00:00<00:00]")
        sys.stderr.flush()
        time.sleep(0.05 if mode != "slow" else 0.2)
    sys.stderr.write("\n")
    if mode == "fail":
        sys.stderr.write("Traceback (most recent call last):\nRuntimeError: the fake evaluation broke\n")
        return
    if mode == "hostile":
        sys.stderr.write(f"first {HOSTILE}\nlast {HOSTILE}\n")
        return
    write_results(output, tasks)


if __name__ == "__main__":
    main()
