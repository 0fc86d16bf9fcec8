"""The trainer's side of the turnaround benchmark (`bench/run.py --only turnaround`).

    python bench/turnaround_save.py --run-dir RUN --source 100=MODEL_A --source 200=MODEL_B [--callback ...]

Reads one command a line from stdin and answers each with one JSON line on stdout:

- `probe STEP`: writes STEP's weight files into a scratch folder beside the run folder, the
  way a save does, and times plain reads of all their bytes: right after writing (`read_s`),
  again (`warm_s`), and after the files were synced and dropped from the page cache (`cold_s`,
  a read from the disk); the scratch folder is then removed. Timed apart from the save, so
  that the reads compete with nothing the benchmark measures.
- `save STEP`: writes `checkpoint-STEP` into the run folder as a Hugging Face Trainer's
  `_save_checkpoint` does (config and generation config, the weights, the tokenizer and the
  model's other files, then `trainer_state.json` last) and answers with `saved`, the Unix
  time right after the last file was closed. With `--callback`, `EvalqCallback.on_save` is
  then called, as the Trainer calls it right after the checkpoint is written.
- `end`: with `--callback`, `on_train_end` (its queued submissions are sent), then exits.

It runs as its own process so that the evalq it imports is the one on its PYTHONPATH: the
benchmark measures an older commit's `EvalqCallback` the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

CHUNK = 16 << 20


def weight_files(folder: Path) -> list[str]:
    """The checkpoint's weight files, in the order save_pretrained writes them (shards, then the index)."""
    shards = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    index = [p.name for p in folder.iterdir() if p.name.endswith(".safetensors.index.json")]
    return shards + index


def write_checkpoint(source: Path, target: Path, step: int) -> float:
    """Write the checkpoint into `target` the way a Trainer saves; the time the last file was closed."""
    target.mkdir(parents=True)
    weights = weight_files(source)
    first = [n for n in ("config.json", "generation_config.json") if (source / n).exists()]
    rest = sorted(p.name for p in source.iterdir() if p.is_file() and p.name not in {*weights, *first})
    for name in [*first, *weights, *rest]:
        shutil.copyfile(source / name, target / name)
    state = {"global_step": step, "epoch": step / 1000, "log_history": [], "best_model_checkpoint": None}
    with open(target / "trainer_state.json", "w") as handle:
        json.dump(state, handle)
    return time.time()


def read_all(paths: list[Path]) -> float:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    began = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - began


def probe(source: Path, scratch: Path, step: int) -> dict[str, Any]:
    if scratch.exists():
        shutil.rmtree(scratch)
    began = time.perf_counter()
    write_checkpoint(source, scratch, step)
    write_s = time.perf_counter() - began
    paths = [scratch / n for n in weight_files(scratch) if n.endswith(".safetensors")]
    read_s = read_all(paths)
    warm_s = read_all(paths)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped: written back first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    cold_s = read_all(paths)
    size = sum(p.stat().st_size for p in paths)
    shutil.rmtree(scratch)
    return {"probe": step, "bytes": size, "write_s": write_s, "read_s": read_s, "warm_s": warm_s, "cold_s": cold_s}


def make_callback(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """The callback, and the Trainer's own argument, state and control objects it is given."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from evalq.integrations import EvalqCallback

    callback = EvalqCallback(
        tasks=args.tasks.split(","),
        model=args.model,
        model_args=json.loads(args.model_args),
        limit=args.limit,
        run=args.run,
    )
    training = TrainingArguments(output_dir=str(args.run_dir), use_cpu=True, report_to=[], save_steps=100)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(training, state, control)
    return callback, training, state, control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--source", action="append", default=[], help="STEP=FOLDER: the weights saved at STEP")
    parser.add_argument("--callback", action="store_true", help="call EvalqCallback.on_save after each save")
    parser.add_argument("--tasks", default="evalq_demo")
    parser.add_argument("--model", default="huggingface")
    parser.add_argument("--model-args", default="{}")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--run", default="bench")
    args = parser.parse_args()
    sources = {int(step): Path(folder) for step, _, folder in (s.partition("=") for s in args.source)}
    args.run_dir.mkdir(parents=True, exist_ok=True)
    callback = make_callback(args) if args.callback else None

    def answer(reply: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "probe":
            step = int(value)
            answer(probe(sources[step], args.run_dir.parent / f".probe-{args.run_dir.name}", step))
        elif command == "save":
            step = int(value)
            saved = write_checkpoint(sources[step], args.run_dir / f"checkpoint-{step}", step)
            if callback is not None:
                cb, training, state, control = callback
                state.global_step = step
                cb.on_save(training, state, control)
            answer({"step": step, "saved": saved, "on_save_s": time.time() - saved})
        elif command == "end":
            if callback is not None:
                cb, training, state, control = callback
                cb.on_train_end(training, state, control)
                answer({"end": True, "errors": [i.error for i in cb.submitted if i.error]})
            else:
                answer({"end": True, "errors": []})
            return


if __name__ == "__main__":
    main()
