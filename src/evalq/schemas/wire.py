"""What every wire type builds on: the Struct base (frozen, keyword-only, every field written
out), the time format, a job's statuses, and its progress."""

from __future__ import annotations

import datetime as _dt
import time
from typing import Literal

from msgspec import Struct

__all__ = ["TERMINAL", "CreationClock", "JobStatus", "Progress", "Wire", "now"]


class Wire(Struct, frozen=True, kw_only=True, omit_defaults=False):
    pass


JobStatus = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


def now() -> str:
    """The current time as RFC 3339 UTC, the only time format on the wire."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CreationClock:
    """A job's `created_at`: microseconds, and later than the last one this clock gave.

    The history orders jobs by `created_at`; in milliseconds, jobs submitted one after
    another in the same millisecond would be listed by id instead of in the order they came.
    """

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> str:
        self._last = micros = max(time.time_ns() // 1000, self._last + 1)
        moment = _dt.datetime.fromtimestamp(micros // 1_000_000, _dt.UTC).replace(microsecond=micros % 1_000_000)
        return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Progress(Wire, frozen=True, kw_only=True):
    phase: str
    done: int
    total: int
    percent: float
