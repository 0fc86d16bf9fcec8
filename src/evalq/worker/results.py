"""Finding and reading what lmms-eval wrote: `*_results.json`, samples, the log.

Success is read from the results file, never the exit code (lmms-eval exits 0 after a
failed run). Nothing here follows a symlink, so a link planted in the results root
cannot make the worker read or upload files from outside it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["ResultFiles", "collect", "metrics_of", "tail"]

_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class ResultFiles:
    def __init__(self, results: Path | None, samples: list[Path]) -> None:
        self.results = results
        self.samples = samples


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(directory, d)))
        for name in sorted(files):
            path = Path(directory, name)
            if not path.is_symlink() and path.is_file():
                found.append(path)
    return found


def collect(output: Path) -> ResultFiles:
    """The newest `*_results.json` under `output` (searched recursively) and the samples."""
    files = _walk(output) if output.is_dir() else []
    results = [p for p in files if p.name.endswith("_results.json")]
    samples = [p for p in files if p.suffix == ".jsonl" and "_samples_" in p.name]
    newest = max(results, key=lambda p: (p.stat().st_mtime, p.name)) if results else None
    return ResultFiles(newest, samples)


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
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    kept = [line for line in text.split("\n") if line.strip()]
    return "\n".join(kept[-lines:])
