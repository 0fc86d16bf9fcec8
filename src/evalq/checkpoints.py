"""`evalq watch-dir`: one evaluation per new, complete checkpoint folder.

A checkpoint is complete when its files are all there and have not changed between two
scans. The default rule suits Hugging Face checkpoints: every shard that
`model.safetensors.index.json` names is present (or the single `model.safetensors` is);
the marker rule waits for a file the trainer writes last.

Each submission's Idempotency-Key is derived from the folder's path and its content stamp
(names, sizes and modification times of its files), and the state file records what was
submitted, so a restart submits nothing twice and skips nothing: a folder seen complete is
submitted, once, whenever the watcher runs next.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .publisher import AsyncClient

__all__ = ["INDEX", "Checkpoint", "DirWatcher", "content_stamp", "step_of"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
Stamp = tuple[tuple[str, int, int], ...]


def content_stamp(folder: Path, marker: str | None = None) -> Stamp | None:
    """The checkpoint's files as (name, size, mtime_ns), or None while it is incomplete.

    With `marker`, complete means the marker file exists (the stamp covers every file at the
    top of the folder); without it, the weights a Hugging Face checkpoint names are present.
    """
    try:
        if marker is not None:
            if not (folder / marker).is_file():
                return None
            names = sorted(entry.name for entry in os.scandir(folder) if entry.is_file())
        elif (folder / INDEX).is_file():
            try:
                index = json.loads((folder / INDEX).read_text())
                shards = sorted(set(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                return None  # being written
            names = [INDEX, *shards]
        elif (folder / SINGLE).is_file():
            names = [SINGLE]
        else:
            return None
        stats = [(name, (folder / name).stat()) for name in names]
    except (FileNotFoundError, NotADirectoryError):
        return None
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def step_of(name: str, pattern: re.Pattern[str]) -> int | None:
    """The step in a folder's name: the regex's first group (or whole match), as a number."""
    match = pattern.search(name)
    if match is None:
        return None
    text = match.group(1) if pattern.groups else match.group(0)
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Checkpoint:
    path: str
    step: int | None
    job_id: str
    duplicate: bool


class DirWatcher:
    """Scans `directory` for folders matching `pattern`; submits each once it is complete and stable."""

    def __init__(
        self,
        client: AsyncClient,
        directory: str | os.PathLike[str],
        request: dict[str, Any],
        *,
        pattern: str = "checkpoint-*",
        step_regex: str = r"(\d+)",
        step_label: str = "step",
        marker: str | None = None,
        state_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.client = client
        self.directory = Path(directory).resolve()
        self.request = request
        self.pattern = pattern
        try:
            self.step_regex = re.compile(step_regex)
        except re.error as exc:
            raise ConfigError(f"--step-regex {step_regex!r} is not a regular expression: {exc}") from None
        self.step_label = step_label
        self.marker = marker
        default_state = client.settings.home_path / "watch-dir" / f"{_digest(str(self.directory))[:16]}.json"
        self.state_file = Path(state_file) if state_file is not None else default_state
        self._seen: dict[str, Stamp] = {}  # the previous scan's stamps
        self._submitted: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise ConfigError(f"the watch-dir state file {self.state_file} is not JSON: move it away") from None
        return dict(data.get("submitted", {}))

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_suffix(".partial")
        partial.write_text(json.dumps({"directory": str(self.directory), "submitted": self._submitted}, indent=1))
        os.replace(partial, self.state_file)

    def candidates(self) -> list[Path]:
        if not self.directory.is_dir():
            raise ConfigError(f"{self.directory} is not a folder")
        found = [
            Path(entry.path)
            for entry in os.scandir(self.directory)
            if entry.is_dir() and fnmatch.fnmatchcase(entry.name, self.pattern)
        ]
        # In step order, so the evaluations queue in the order training made them.
        return sorted(found, key=lambda p: (step_of(p.name, self.step_regex) or 0, p.name))

    async def scan(self) -> list[Checkpoint]:
        """One pass: submit each folder whose complete stamp equals the previous pass's."""
        submitted = []
        for folder in self.candidates():
            path = str(folder)
            stamp = content_stamp(folder, self.marker)
            previous = self._seen.get(path)
            if stamp is None:
                self._seen.pop(path, None)
                continue
            self._seen[path] = stamp
            key = "watch-dir:" + _digest(json.dumps([path, stamp]))
            if self._submitted.get(path, {}).get("key") == key:
                continue
            if previous != stamp:
                continue  # wait one more pass for its sizes to settle
            step = step_of(folder.name, self.step_regex)
            submitted.append(await self._submit(folder, step, key))
        return submitted

    async def _submit(self, folder: Path, step: int | None, key: str) -> Checkpoint:
        fields = dict(self.request)
        fields["model_args"] = _with_pretrained(fields.get("model_args"), str(folder))
        labels = dict(fields.get("labels") or {})
        if step is not None:
            labels[self.step_label] = str(step)
        labels.setdefault("checkpoint", folder.name)
        fields["labels"] = labels
        accepted = await self.client.submit(fields, idempotency_key=key)
        self._submitted[str(folder)] = {"key": key, "job_id": accepted.job_id, "step": step}
        self._save()
        return Checkpoint(str(folder), step, accepted.job_id, accepted.duplicate)

    async def run(
        self,
        interval: float,
        stop: asyncio.Event,
        on_submit: Callable[[Checkpoint], None] | None = None,
        *,
        passes: int | None = None,
    ) -> None:
        done = 0
        while not stop.is_set():
            for checkpoint in await self.scan():
                if on_submit is not None:
                    on_submit(checkpoint)
            done += 1
            if passes is not None and done >= passes:
                return
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _with_pretrained(model_args: dict[str, Any] | str | None, path: str) -> dict[str, Any] | str:
    if model_args is None:
        return {"pretrained": path}
    if isinstance(model_args, dict):
        return {**model_args, "pretrained": path}
    kept = [item for item in model_args.split(",") if item and not item.startswith("pretrained=")]
    return ",".join([f"pretrained={path}", *kept])
