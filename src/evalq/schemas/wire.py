"""What every wire type builds on: the Struct base (frozen, keyword-only, every field written
out), the time format, a job's statuses, and its progress."""

from __future__ import annotations

import datetime as _dt
from typing import Literal

from msgspec import Struct

__all__ = ["TERMINAL", "JobStatus", "Progress", "Wire", "now"]


class Wire(Struct, frozen=True, kw_only=True, omit_defaults=False):
    pass


JobStatus = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


def now() -> str:
    """The current time as RFC 3339 UTC, the only time format on the wire."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Progress(Wire, frozen=True, kw_only=True):
    phase: str
    done: int
    total: int
    percent: float
