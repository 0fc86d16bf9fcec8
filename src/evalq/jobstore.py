"""Job records in the `<prefix>-jobs` bucket; every state change is a compare-and-set.

The gateway and the workers both write here, only through `lifecycle.Recorder`. A transition reads the record and its
revision, computes the next record, and writes it only if the revision is unchanged; on
a conflict it reads again. So two writers racing for a terminal state cannot both win,
which is what makes the terminal record (and its event) exist exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .errors import Conflict
from .schemas import JobInfo, decode, encode

__all__ = ["JobStore"]

log = logging.getLogger("evalq")

Change = Callable[[JobInfo], JobInfo | None]


class JobStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, job_id: str) -> tuple[JobInfo, int] | None:
        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return _read(entry.value), entry.revision or 0

    async def create(self, info: JobInfo) -> int | None:
        """Write a new record; None if one exists already (someone else created it)."""
        try:
            return await self.kv.create(info.job_id, encode(info))
        except KeyWrongLastSequenceError:
            return None

    async def transition(self, job_id: str, change: Change, *, tries: int = 50) -> tuple[JobInfo, JobInfo] | None:
        """Apply `change` atomically; returns (before, after), or None if it declined or no record.

        `change` returns the new record, or None when the current state does not allow it.
        """
        for _ in range(tries):
            current = await self.get(job_id)
            if current is None:
                return None
            before, revision = current
            after = change(before)
            if after is None:
                return None
            try:
                await self.kv.update(job_id, encode(after), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return before, after
        raise Conflict(f"job {job_id}: too many concurrent updates")


def _read(data: bytes) -> JobInfo:
    """A stored record. One whose request fails today's rules (stored before a rule was
    added) is still a record: its request reads as None, so the job can be failed, shown
    and cancelled, but never run."""
    try:
        return decode(data, JobInfo)
    except msgspec.ValidationError as exc:
        if "`$.request" not in str(exc):
            raise
        raw = msgspec.json.decode(data, type=dict[str, Any])
        raw["request"] = None
        log.warning("job %s: its stored request is not valid any more (%s)", raw.get("job_id"), exc)
        return msgspec.convert(raw, JobInfo)
