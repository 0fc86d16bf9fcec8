"""Filesystem events for the folders under one folder: which of them were touched, and when.

The platform's observer runs on threads of its own; `FolderEvents` turns what it reports into
the names of the touched subfolders, each with the time of its latest event, and wakes the
asyncio loop once per batch. Where no observer can be had (no platform support, a kernel
limit on watches or instances), `start` raises ConfigError saying why, and the caller scans.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["NETWORK_FILESYSTEMS", "FolderEvents", "filesystem_type"]

# Filesystems whose changes made on another machine raise no event on this one.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "gpfs", "beegfs", "glusterfs", "9p", "afs"}
)


def filesystem_type(path: str | os.PathLike[str], mountinfo: str | None = None) -> str | None:
    """The type of the filesystem `path` is on (Linux's mount table), or None where it cannot be told."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.fspath(path)
    best, kind = "", None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        # A later line at the same mount point is mounted over the earlier one.
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


class FolderEvents:
    """Filesystem events under `directory`, as the subfolders matching `pattern` that they touched.

    The observer's thread records each touched folder with the time of its latest event and
    wakes the loop once per batch; the loop takes the batch (`take`).
    """

    def __init__(self, directory: Path, pattern: str) -> None:
        self.directory = str(directory)
        self.pattern = pattern
        self.wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._signalled = False
        self._observer: Any = None

    def start(self) -> None:
        """Watch the folder and all below it; ConfigError, saying why, where events cannot be had."""
        try:
            from watchdog import events as kinds
            from watchdog.observers import Observer
            from watchdog.observers.polling import PollingObserver
        except ImportError as exc:
            raise ConfigError(f"filesystem events are unavailable: {exc}") from None
        if Observer is PollingObserver:
            raise ConfigError("filesystem events are unavailable on this platform")
        touch = self._touch

        class Handler(kinds.FileSystemEventHandler):
            def on_any_event(self, event: kinds.FileSystemEvent) -> None:
                touch(event)

        # Opening and reading are left out: the watcher's own reads would look like changes.
        wanted: list[type[kinds.FileSystemEvent]] = [
            kinds.FileCreatedEvent,
            kinds.DirCreatedEvent,
            kinds.FileModifiedEvent,
            kinds.DirModifiedEvent,
            kinds.FileDeletedEvent,
            kinds.DirDeletedEvent,
            kinds.FileMovedEvent,
            kinds.DirMovedEvent,
            kinds.FileClosedEvent,
        ]
        observer = None
        try:
            observer = Observer()
            observer.schedule(Handler(), self.directory, recursive=True, event_filter=wanted)
            observer.start()
        except OSError as exc:
            # The kernel's limits on watches and instances land here, with their own words.
            if observer is not None:
                observer.stop()  # the reading thread it started on creation
            raise ConfigError(f"filesystem events are unavailable: {exc.strerror or exc}") from None
        self._observer = observer

    def _touch(self, event: Any) -> None:
        """On the observer's thread: note the subfolder(s) the event touched."""
        at = time.monotonic()
        names = set()
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(raw)
            if path.startswith(self.directory + os.sep):
                name = path[len(self.directory) + 1 :].split(os.sep, 1)[0]
                if fnmatch.fnmatchcase(name, self.pattern):
                    names.add(name)
        if not names:
            return
        with self._lock:
            for name in names:
                self._touched[os.path.join(self.directory, name)] = at
            signal, self._signalled = not self._signalled, True
        if signal:
            try:
                self._loop.call_soon_threadsafe(self.wake.set)
            except RuntimeError:
                pass  # the loop has closed: the watcher is stopping

    def take(self) -> dict[str, float]:
        """The folders touched since the last take, each with the time of its latest event."""
        with self._lock:
            touched, self._touched, self._signalled = self._touched, {}, False
        self.wake.clear()
        return touched

    def alive(self) -> bool:
        observer = self._observer
        return observer is not None and observer.is_alive() and all(e.is_alive() for e in observer.emitters)

    def close(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(10)
