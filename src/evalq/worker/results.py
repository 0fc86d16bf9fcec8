"""Finding and reading what lmms-eval wrote: `*_results.json`, samples, the log.

Success is read from the results file, never the exit code (lmms-eval exits 0 after a
failed run). Nothing here follows a symlink, so a link planted in the results root
cannot make the worker read or upload files from outside it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..fields import JOB_ID_SEGMENT
from ..lifecycle import Failure, Outcome, Success
from ..schemas import JobResult
from ..text import strip_ansi

__all__ = ["ResultFiles", "collect", "metrics_of", "outcome_of", "tail", "upload"]

_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class ResultFiles:
    def __init__(
        self, results: Path | None, samples: list[Path], problem: str = "no *_results.json was written"
    ) -> None:
        self.results = results
        self.samples = samples
        self.problem = problem


def _files(directory: Path) -> list[Path]:
    """Regular files directly in `directory`, no links."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    return [p for p in entries if not p.is_symlink() and p.is_file()]


def collect(output: Path, *, since: float | None = None) -> ResultFiles:
    """The results file this run wrote in its own folder, and its samples.

    lmms-eval writes `<output>/<model>/<date_id>_results.json` (or straight into `<output>`
    when the model has no name), and `<date_id>_samples_<task>.jsonl` beside it. Only those
    two levels are read, and only in this job's folder, which the worker made empty for
    this run: a folder shaped like another job's is never entered, and more than one
    results file, or one older than the run (`since`, a wall-clock time), is not a result.
    """
    if not output.is_dir() or output.is_symlink():
        return ResultFiles(None, [])
    places = [output] + [
        d
        for d in sorted(output.iterdir())
        if d.is_dir() and not d.is_symlink() and not JOB_ID_SEGMENT.fullmatch(d.name)
    ]
    found = [p for place in places for p in _files(place) if p.name.endswith("_results.json")]
    if not found:
        return ResultFiles(None, [])
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(output)) for p in found)
        return ResultFiles(None, [], f"more than one results file was found ({names}); none is taken as this run's")
    results = found[0]
    if since is not None and results.stat().st_mtime < since - 1.0:
        return ResultFiles(None, [], f"{results.name} predates this run")
    date_id = results.name[: -len("_results.json")]
    samples = [p for p in _files(results.parent) if p.name.startswith(f"{date_id}_samples_") and p.suffix == ".jsonl"]
    return ResultFiles(results, samples)


def metrics_of(results_file: Path) -> dict[str, dict[str, Any]]:
    """task -> metric -> value, from the `results` section.

    lmms-eval names metrics `metric,filter`; the `,none` of the default filter is dropped,
    so the demo's accuracy reads `metrics["evalq_demo"]["exact_match"]`.
    """
    data = json.loads(results_file.read_text())
    section = data.get("results")
    if not isinstance(section, dict):
        raise ValueError("no `results` section")
    metrics: dict[str, dict[str, Any]] = {}
    for task, values in section.items():
        if not isinstance(values, dict):
            continue
        row: dict[str, Any] = {}
        for key, value in values.items():
            if key == "alias" or not isinstance(value, (int, float, str)) or isinstance(value, bool):
                continue
            name = key[: -len(",none")] if key.endswith(",none") else key
            row[name] = value
        metrics[str(task)] = row
    return metrics


def safe_name(name: str) -> str:
    """An object-store name segment: no separators, no `..`."""
    cleaned = _SAFE.sub("_", name).lstrip(".")
    return cleaned or "file"


def tail(path: Path, lines: int = 40, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r", "\n")
    text = strip_ansi(text)
    kept = [line for line in text.split("\n") if line.strip()]
    return "\n".join(kept[-lines:])


Upload = Callable[[str, bytes], Awaitable[object]]


async def upload(put: Upload, job_id: str, files: list[tuple[Path, str]]) -> list[str]:
    """Store each regular file as `<job_id>/<name>`; returns the names stored."""
    names = []
    for path, name in files:
        if path.is_symlink() or not path.is_file():
            continue
        object_name = f"{job_id}/{name}"
        await put(object_name, path.read_bytes())
        names.append(object_name)
    return names


async def outcome_of(
    output: Path,
    log_path: Path,
    exit_code: int,
    *,
    job_id: str,
    put: Upload,
    duration_s: float,
    tail_lines: int,
    started_at: float | None = None,
) -> Outcome:
    """What a finished evaluation produced, its artifacts uploaded: a Success or a Failure."""
    files = collect(output, since=started_at)
    metrics = None
    problem = files.problem
    if files.results is not None:
        try:
            metrics = metrics_of(files.results)
        except (ValueError, OSError) as exc:
            problem = f"{files.results.name} could not be read: {exc}"
    if metrics is None:
        log_tail = tail(log_path, tail_lines)
        last = log_tail.splitlines()[-1] if log_tail else ""
        error = f"lmms-eval exited with code {exit_code} and {problem}" + (f": {last}" if last else "")
        await upload(put, job_id, [(log_path, "eval.log")])
        return Failure(error=error, exit_code=exit_code, log_tail=log_tail)
    artifacts = [(files.results, "results.json")] if files.results else []
    artifacts += [(sample, f"samples/{safe_name(sample.name)}") for sample in files.samples]
    artifacts.append((log_path, "eval.log"))
    names = await upload(put, job_id, artifacts)
    return Success(result=JobResult(metrics=metrics, artifacts=names, duration_s=duration_s))
