"""`evalq watch-dir`: one evaluation per new, complete checkpoint folder.

A checkpoint is complete when its files are all there and have not changed between two
scans. The default rule suits Hugging Face checkpoints: every shard that
`model.safetensors.index.json` names is present (or the single `model.safetensors` is);
the marker rule waits for a file the trainer writes last.

Each submission's Idempotency-Key is derived from the folder's path and its content stamp
(names, sizes and modification times of its files), and the state file records what was
submitted, so a restart submits nothing twice and skips nothing: a folder seen complete is
submitted, once, whenever the watcher runs next.

A folder the queue refuses (a 4xx: its name cannot be a model path, a field is out of range)
is logged, recorded in the state file as refused and skipped until its files or the request
change; the other folders go on. A failure that may pass (no gateway, a timeout, no
connection) leaves the folder to the next scan.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConnectError, EvalqError, RequestError, Timeout
from .fields import ARG_KEY, ARG_TEXT
from .publisher import AsyncClient
from .text import escape_control

__all__ = ["INDEX", "Checkpoint", "DirWatcher", "Failed", "Refused", "Scan", "Summary", "content_stamp", "step_of"]

log = logging.getLogger("evalq.checkpoints")

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


@dataclass(frozen=True)
class Refused:
    """A folder the queue refused (a 4xx): skipped until its files or the request change."""

    path: str
    step: int | None
    # The refusal as the gateway gave it: code, message and JSON path.
    refused: str


@dataclass(frozen=True)
class Failed:
    """A folder not submitted for a reason that may pass (503, a timeout, no connection)."""

    path: str
    step: int | None
    error: EvalqError


@dataclass
class Scan:
    """One pass: what was submitted, refused, and left for the next pass."""

    submitted: list[Checkpoint] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)


@dataclass
class Summary:
    """A run's passes: every submission and refusal, and what the last pass left unsubmitted."""

    submitted: list[Checkpoint] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)


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
        # The folder is sent as one value of a JSON object, never spliced into a `k=v` string,
        # where a comma in its name would end the path and add arguments of its own.
        self.request = {**request, "model_args": _args_dict(request.get("model_args"))}
        self._request_digest = _digest(json.dumps(self.request, sort_keys=True, default=str))
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
        self._submitted: dict[str, dict[str, Any]] = {}
        self._refused: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            raise ConfigError(f"the watch-dir state file {self.state_file} is not JSON: move it away") from None
        self._submitted = dict(data.get("submitted", {}))
        self._refused = dict(data.get("refused", {}))

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_suffix(".partial")
        state = {"directory": str(self.directory), "submitted": self._submitted, "refused": self._refused}
        partial.write_text(json.dumps(state, indent=1))
        os.replace(partial, self.state_file)

    def _done(self, path: str, key: str) -> bool:
        """Submitted with this key, or refused with this key and this request."""
        if self._submitted.get(path, {}).get("key") == key:
            return True
        refused = self._refused.get(path, {})
        # A changed request (another --tasks, --model-args) may be accepted: try again.
        return refused.get("key") == key and refused.get("request") == self._request_digest

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

    async def scan(self) -> Scan:
        """One pass: submit each folder whose complete stamp equals the previous pass's.

        A refused folder is recorded and skipped; after a failure that may pass, the queue is
        taken to be away and the pass submits nothing more (the next one tries again, in order).
        """
        result = Scan()
        for folder in self.candidates():
            path = str(folder)
            stamp = content_stamp(folder, self.marker)
            previous = self._seen.get(path)
            if stamp is None:
                self._seen.pop(path, None)
                continue
            self._seen[path] = stamp
            key = "watch-dir:" + _digest(json.dumps([path, stamp]))
            if self._done(path, key):
                continue
            if previous != stamp or result.failed:
                continue  # wait one more pass for its sizes to settle, or for the queue
            step = step_of(folder.name, self.step_regex)
            try:
                result.submitted.append(await self._submit(folder, step, key))
            except RequestError as exc:
                if not 400 <= exc.code < 500:
                    result.failed.append(self._failed(path, step, exc))
                    continue
                result.refused.append(self._refuse(path, step, key, exc))
            except (Timeout, ConnectError) as exc:
                result.failed.append(self._failed(path, step, exc))
        return result

    def _refuse(self, path: str, step: int | None, key: str, exc: RequestError) -> Refused:
        reason = str(exc)
        log.warning(
            "the queue refused the checkpoint %s; skipped until its files or the request change: %s",
            escape_control(path),
            escape_control(reason),
        )
        self._refused[path] = {"key": key, "request": self._request_digest, "step": step, "refused": reason}
        self._save()
        return Refused(path, step, reason)

    @staticmethod
    def _failed(path: str, step: int | None, exc: EvalqError) -> Failed:
        log.warning(
            "the checkpoint %s was not submitted, tried again next scan: %s", escape_control(path), escape_control(exc)
        )
        return Failed(path, step, exc)

    async def _submit(self, folder: Path, step: int | None, key: str) -> Checkpoint:
        fields = dict(self.request)
        fields["model_args"] = {"pretrained": str(folder), **fields["model_args"]}
        labels = dict(fields.get("labels") or {})
        if step is not None:
            labels[self.step_label] = str(step)
        labels.setdefault("checkpoint", folder.name)
        fields["labels"] = labels
        accepted = await self.client.submit(fields, idempotency_key=key)
        self._submitted[str(folder)] = {"key": key, "job_id": accepted.job_id, "step": step}
        self._refused.pop(str(folder), None)
        self._save()
        return Checkpoint(str(folder), step, accepted.job_id, accepted.duplicate)

    async def run(
        self,
        interval: float,
        stop: asyncio.Event,
        on_submit: Callable[[Checkpoint], None] | None = None,
        *,
        passes: int | None = None,
        on_refused: Callable[[Refused], None] | None = None,
    ) -> Summary:
        """Scan every `interval` seconds until `stop` (or `passes` passes).

        With `passes` (`--once`), a checkpoint the last pass could not submit for a reason
        that may pass is this run's failure: its error is raised once the passes are done.
        Refused checkpoints are not: they are reported (`on_refused`) and recorded.
        """
        summary = Summary()
        done = 0
        while not stop.is_set():
            scanned = await self.scan()
            for checkpoint in scanned.submitted:
                if on_submit is not None:
                    on_submit(checkpoint)
            for refused in scanned.refused:
                if on_refused is not None:
                    on_refused(refused)
            summary.submitted += scanned.submitted
            summary.refused += scanned.refused
            summary.failed = scanned.failed
            done += 1
            if passes is not None and done >= passes:
                if summary.failed:
                    raise summary.failed[-1].error
                break
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
        return summary


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _args_dict(model_args: dict[str, Any] | str | None) -> dict[str, Any]:
    """The request's model_args as a dict, without `pretrained` (each folder sets its own)."""
    if model_args is None:
        return {}
    if isinstance(model_args, dict):
        return {k: v for k, v in model_args.items() if k != "pretrained"}
    args: dict[str, Any] = {}
    for item in model_args.split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not ARG_KEY.fullmatch(key) or not ARG_TEXT.fullmatch(value):
            raise ConfigError(
                f"--model-args {model_args!r}: expected k=v,k=v with no `,` or `=` inside a key or value, got {item!r}"
            )
        if key != "pretrained":
            args[key] = value
    return args
