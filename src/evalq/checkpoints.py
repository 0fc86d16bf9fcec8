"""`evalq watch-dir`: one evaluation per new, complete checkpoint folder.

A checkpoint is complete by the folder's own files: every shard that
`model.safetensors.index.json` names is present (or the single `model.safetensors` is), or,
with the marker rule, a file the trainer writes last exists. It is settled once nothing in
it has changed for the settle window: no filesystem event touched the folder in that time,
and its content stamp (names, sizes and modification times of those files) was the same
at the window's start and at its end. Only a complete, settled checkpoint is submitted.

Changes are learnt from filesystem events where they arrive, so a checkpoint is submitted
about one settle window after its last file is closed. A slow rescan at the interval runs
beside them, since events can be dropped (a full kernel queue) or never come (a change made
on another machine of a network filesystem); where events cannot be had at all, the rescan
alone finds checkpoints, one settle window after the scan that first sees them complete.

Each submission's Idempotency-Key is derived from the folder's path and its content stamp,
and the state file records what was submitted, so a restart submits nothing twice and skips
nothing: a folder seen complete is submitted, once, whenever the watcher runs next.

A folder the queue refuses (a 4xx: its name cannot be a model path, a field is out of range)
is logged, recorded in the state file as refused and skipped until its files or the request
change; a folder that cannot be read (no permission, an I/O error) is logged and skipped
until it can be; the other folders go on. A failure that may pass (no gateway, a timeout, no
connection) leaves the folder to a later pass.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConnectError, EvalqError, RequestError, Timeout
from .fields import ARG_KEY, ARG_TEXT
from .fs_events import NETWORK_FILESYSTEMS, FolderEvents, filesystem_type
from .publisher import AsyncClient
from .text import escape_control

__all__ = [
    "INDEX",
    "Checkpoint",
    "DirWatcher",
    "Failed",
    "Refused",
    "Scan",
    "Summary",
    "content_stamp",
    "saved_at",
    "step_of",
]

log = logging.getLogger("evalq.checkpoints")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
Stamp = tuple[tuple[str, int, int], ...]
# After a failure that may pass, the queue is asked again after this long (or the interval, if shorter).
RETRY_S = 5.0
# Events come in bursts (a shard written in many pieces): one look at the folders per burst.
BURST_S = 0.05
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


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


def saved_at(stamp: Stamp) -> str:
    """When the checkpoint was saved: its files' newest modification time, RFC 3339 in UTC."""
    newest = max(mtime_ns for _, _, mtime_ns in stamp)
    # Integer microseconds: a float of seconds may print one millisecond early.
    moment = _EPOCH + _dt.timedelta(microseconds=newest // 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    """Watches `directory` for folders matching `pattern`; submits each once it is complete and settled.

    `settle`: seconds a checkpoint's files must stay unchanged before it is submitted.
    `events`: learn of changes from filesystem events (True), by rescanning only (False), or
    events unless they cannot be had or the folder is on a network filesystem (None).
    """

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
        settle: float = 1.0,
        events: bool | None = None,
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
        if not settle >= 0:
            raise ConfigError(f"--settle must be 0 or more seconds, got {settle}")
        self.settle = settle
        self.events = events
        default_state = client.settings.home_path / "watch-dir" / f"{_digest(str(self.directory))[:16]}.json"
        self.state_file = Path(state_file) if state_file is not None else default_state
        # Each complete folder's stamp and when it was first seen with that stamp (monotonic).
        self._pending: dict[str, tuple[Stamp, float]] = {}
        # When an event last touched each folder (monotonic), and the folders not looked at since.
        self._touched: dict[str, float] = {}
        self._fresh: set[str] = set()
        self._unreadable: dict[str, str] = {}  # folder -> the error logged for it, logged once
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
        try:
            if not self.directory.is_dir():
                raise ConfigError(f"{self.directory} is not a folder")
            with os.scandir(self.directory) as entries:
                found = [
                    Path(entry.path)
                    for entry in entries
                    if fnmatch.fnmatchcase(entry.name, self.pattern) and _is_dir(entry)
                ]
        except OSError as exc:
            raise ConfigError(f"{self.directory} cannot be read: {exc.strerror or exc}") from None
        return self._in_order(found)

    def _in_order(self, folders: Iterable[Path]) -> list[Path]:
        # In step order, so the evaluations queue in the order training made them.
        return sorted(folders, key=lambda p: (step_of(p.name, self.step_regex) or 0, p.name))

    async def scan(self) -> Scan:
        """One pass over every folder: see `check`."""
        return await self.check(self.candidates())

    async def check(self, folders: Iterable[Path]) -> Scan:
        """Look at `folders`; submit each whose complete stamp has been unchanged for the settle window.

        A folder is submitted the second time it is seen with the same stamp, at least
        `settle` seconds after the first time and after the latest event that touched it.
        A refused folder is recorded and skipped; after a failure that may pass, the queue is
        taken to be away and the pass submits nothing more (a later one tries again, in order).
        """
        result = Scan()
        for folder in self._in_order(set(folders)):
            path = str(folder)
            self._fresh.discard(path)
            now = time.monotonic()
            stamp = self._stamp(folder)
            if stamp is None:
                self._forget(path)
                continue
            key = "watch-dir:" + _digest(json.dumps([path, stamp]))
            if self._done(path, key):
                self._forget(path)
                continue
            seen = self._pending.get(path)
            if seen is None or seen[0] != stamp:
                self._pending[path] = (stamp, now)
                continue  # the window starts now
            if now < self._settled_at(path) or result.failed:
                continue  # still settling, or the queue is away
            step = step_of(folder.name, self.step_regex)
            try:
                result.submitted.append(await self._submit(folder, step, key, stamp))
            except RequestError as exc:
                if not 400 <= exc.code < 500:
                    result.failed.append(self._failed(path, step, exc))
                    continue
                result.refused.append(self._refuse(path, step, key, exc))
            except (Timeout, ConnectError) as exc:
                result.failed.append(self._failed(path, step, exc))
                continue
            self._forget(path)
        return result

    def _stamp(self, folder: Path) -> Stamp | None:
        """The folder's content stamp; None while it is incomplete or cannot be read."""
        path = str(folder)
        try:
            stamp = content_stamp(folder, self.marker)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if self._unreadable.get(path) != reason:
                self._unreadable[path] = reason
                log.warning(
                    "cannot read the checkpoint %s; skipped until it can be read: %s",
                    escape_control(path),
                    escape_control(reason),
                )
            return None
        self._unreadable.pop(path, None)
        return stamp

    def _settled_at(self, path: str) -> float:
        since = self._pending[path][1]
        return max(since, self._touched.get(path, since)) + self.settle

    def _forget(self, path: str) -> None:
        self._pending.pop(path, None)
        self._touched.pop(path, None)

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
            "the checkpoint %s was not submitted, tried again later: %s", escape_control(path), escape_control(exc)
        )
        return Failed(path, step, exc)

    async def _submit(self, folder: Path, step: int | None, key: str, stamp: Stamp) -> Checkpoint:
        fields = dict(self.request)
        fields["model_args"] = {"pretrained": str(folder), **fields["model_args"]}
        labels = dict(fields.get("labels") or {})
        if step is not None:
            labels[self.step_label] = str(step)
        labels.setdefault("checkpoint", folder.name)
        # Not part of the key: the same files are the same job, whenever they were looked at.
        labels["saved_at"] = saved_at(stamp)
        fields["labels"] = labels
        accepted = await self.client.submit(fields, idempotency_key=key)
        self._submitted[str(folder)] = {"key": key, "job_id": accepted.job_id, "step": step}
        self._refused.pop(str(folder), None)
        self._save()
        return Checkpoint(str(folder), step, accepted.job_id, accepted.duplicate)

    def _open_events(self, interval: float) -> tuple[FolderEvents | None, str]:
        """The events source (None: rescans only) and the line that says how the folder is watched."""
        where = escape_control(self.directory)
        settled = f"a checkpoint is submitted {self.settle:g} s after its files stop changing"

        def polling(why: str) -> str:
            return f"watching {where} by scanning every {interval:g} s ({why}); {settled}"

        if self.events is False:
            return None, polling("--poll")
        kind = filesystem_type(self.directory)
        remote = kind in NETWORK_FILESYSTEMS
        if remote and self.events is None:
            why = f"it is on a network filesystem ({kind}), where changes made on other machines raise no event"
            return None, polling(why + "; --events uses them anyway")
        source = FolderEvents(self.directory, self.pattern)
        try:
            source.start()
        except ConfigError as exc:
            if self.events:
                raise ConfigError(f"--events: {exc}; --poll scans instead") from None
            return None, polling(str(exc))
        line = f"watching {where} through filesystem events, rescanned every {interval:g} s; {settled}"
        if remote:
            line += f" (a network filesystem, {kind}: changes made on other machines are found by the rescan)"
        return source, line

    async def run(
        self,
        interval: float,
        stop: asyncio.Event,
        on_submit: Callable[[Checkpoint], None] | None = None,
        *,
        passes: int | None = None,
        on_refused: Callable[[Refused], None] | None = None,
        on_start: Callable[[str], None] | None = None,
    ) -> Summary:
        """Watch until `stop`: through filesystem events, with a rescan every `interval` seconds.

        With `passes` (`--once`), no events: that many scans, a settle window apart. A
        checkpoint the last pass could not submit for a reason that may pass is this run's
        failure: its error is raised once the passes are done. Refused checkpoints are not:
        they are reported (`on_refused`) and recorded. `on_start` gets a line saying how the
        folder is watched.
        """
        summary = Summary()

        def report(scanned: Scan) -> None:
            for checkpoint in scanned.submitted:
                if on_submit is not None:
                    on_submit(checkpoint)
            for refused in scanned.refused:
                if on_refused is not None:
                    on_refused(refused)
            summary.submitted += scanned.submitted
            summary.refused += scanned.refused
            summary.failed = scanned.failed

        if passes is not None:
            for done in range(passes):
                if done and await _stopped(stop, None, self.settle):
                    break
                report(await self.scan())
            if summary.failed:
                raise summary.failed[-1].error
            return summary

        source, line = self._open_events(interval)
        if on_start is not None:
            on_start(line)
        try:
            await self._watch(interval, stop, source, report)
        finally:
            if source is not None:
                await asyncio.to_thread(source.close)
        return summary

    async def _watch(
        self, interval: float, stop: asyncio.Event, source: FolderEvents | None, report: Callable[[Scan], None]
    ) -> None:
        rescan_at = hold_until = time.monotonic()
        while not stop.is_set():
            if source is not None:
                touched = source.take()
                self._touched.update(touched)
                self._fresh.update(touched)
                if not source.alive():
                    log.warning(
                        "filesystem events under %s stopped; scanning every %g s from now on",
                        escape_control(self.directory),
                        interval,
                    )
                    await asyncio.to_thread(source.close)
                    source = None
            now = time.monotonic()
            if now >= hold_until:
                if now >= rescan_at:
                    rescan_at = now + interval
                    folders = self._rescan()
                else:
                    due = [p for p in self._pending if self._settled_at(p) <= now]
                    folders = [Path(p) for p in (*self._fresh, *due)]
                if folders:
                    scanned = await self.check(folders)
                    report(scanned)
                    if scanned.failed:
                        hold_until = time.monotonic() + min(interval, RETRY_S)
            wake_at = min([rescan_at, *(self._settled_at(p) for p in self._pending)])
            if hold_until > time.monotonic():
                wake_at = max(wake_at, hold_until)
            if await _stopped(stop, source, wake_at - time.monotonic()):
                return

    def _rescan(self) -> list[Path]:
        root = str(self.directory)
        try:
            found = self.candidates()
        except ConfigError as exc:
            # The trainer may be recreating it: each rescan looks again, and says so once.
            if self._unreadable.get(root) != str(exc):
                self._unreadable[root] = str(exc)
                log.warning("%s; looked at again in each rescan", escape_control(exc))
            return []
        self._unreadable.pop(root, None)
        return found


async def _stopped(stop: asyncio.Event, source: FolderEvents | None, timeout: float) -> bool:
    """Wait up to `timeout` s for `stop` (True) or, with `source`, a burst of filesystem events."""
    waits = [asyncio.ensure_future(stop.wait())]
    if source is not None:
        waits.append(asyncio.ensure_future(source.wake.wait()))
    try:
        await asyncio.wait(waits, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    if stop.is_set():
        return True
    if source is not None and source.wake.is_set():
        await asyncio.sleep(BURST_S)  # the rest of the burst
    return False


def _is_dir(entry: os.DirEntry[str]) -> bool:
    # An entry that cannot be looked at is a folder: the look at its files says why, once.
    try:
        return entry.is_dir()
    except OSError:
        return True


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
