"""A checkpoint's turnaround: from the moment it was saved to its metrics in the trackers.

A job submitted for a checkpoint (`evalq watch-dir`, `EvalqCallback`) carries the label
`saved_at`, the checkpoint's save time. The job's record and its events hold the rest:

    saved_at ─detection─> created_at ─queue─> started_at ─load, evaluation─> completed_at ─logging─> tracked

- `detection`: saved_at to created_at (the watcher's settle window, the submission);
- `queue`: created_at to the start of the last attempt (earlier attempts included);
- `load`: that attempt's `model_load_seconds` (null where the evaluation process loads its
  own model, which `evaluation` then holds);
- `evaluation`: the last attempt's start to completed_at, less `load`;
- `logging`: completed_at to the first `tracked` event (`evalq track`).

Nothing is written for it: it is computed where it is shown (`evalq status`, the dashboard's
job page) from the record and two stored events (the last `started`, the first `tracked`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable

import msgspec
from msgspec import Struct

from .errors import EvalqError
from .publisher.reads import Reads
from .schemas import Event, JobInfo, Started, Tracked, decode_event

__all__ = ["SAVED_AT", "Turnaround", "read_turnaround", "turnaround", "turnaround_line"]

log = logging.getLogger("evalq.turnaround")

# The label that carries the checkpoint's save time (RFC 3339, UTC, milliseconds).
SAVED_AT = "saved_at"


class Turnaround(Struct, frozen=True, kw_only=True, omit_defaults=False):
    """Seconds from a checkpoint's save to its metrics in the trackers, and the parts of it.

    `total` ends at `logged_at` once a tracker holds the job, else at its completion; it is
    null until the job has completed. A part is null where its ends are not known yet. The
    parts add up to the total (to the millisecond).
    """

    saved_at: str
    logged_at: str | None = None
    total: float | None = None
    detection: float | None = None
    queue: float | None = None
    load: float | None = None
    evaluation: float | None = None
    logging: float | None = None


def _time(text: str | None) -> dt.datetime | None:
    """An RFC 3339 time with a zone; None for anything else (a label is the submitter's text)."""
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _between(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 3)


def turnaround(info: JobInfo, events: Iterable[Event]) -> Turnaround | None:
    """The turnaround of the checkpoint `info` evaluated; None without a readable `saved_at`.

    `events` are the job's, in stream order; only its `started` events and its first
    `tracked` event are read.
    """
    saved = _time(info.labels.get(SAVED_AT))
    if saved is None:
        return None
    started: Started | None = None
    tracked: Tracked | None = None
    for event in events:
        if isinstance(event, Started) and event.attempt == info.attempts:
            started = event
        elif isinstance(event, Tracked) and tracked is None:
            tracked = event
    created, begun = _time(info.created_at), _time(info.started_at)
    completed = _time(info.completed_at) if info.status == "completed" else None
    logged_at = tracked.time if tracked is not None and completed is not None else None
    logged = _time(logged_at)
    load = None
    if started is not None:
        # A re-score loads no model at all.
        load = started.model_load_seconds if started.loads_model else 0.0
    running = _between(begun, completed)
    return Turnaround(
        saved_at=info.labels[SAVED_AT],
        logged_at=logged_at if logged is not None else None,
        total=_between(saved, logged or completed) if completed is not None else None,
        detection=_between(saved, created),
        queue=_between(created, begun),
        load=load,
        evaluation=None if running is None else round(running - (load or 0.0), 3),
        logging=_between(completed, logged),
    )


def turnaround_line(value: Turnaround) -> str:
    """`52.4 s: detection 42.3, queue 0.1, load 5.2, evaluation 2.7, logging 0.2`, as status shows it."""
    parts = ", ".join(
        f"{name} {seconds:.1f}"
        for name, seconds in (
            ("detection", value.detection),
            ("queue", value.queue),
            ("load", value.load),
            ("evaluation", value.evaluation),
            ("logging", value.logging),
        )
        if seconds is not None
    )
    if value.total is None:
        head = "not completed yet"
    elif value.logging is None:
        head = f"{value.total:.1f} s to completion, not logged yet"
    else:
        head = f"{value.total:.1f} s"
    return f"{head}: {parts}" if parts else head


async def read_turnaround(reads: Reads, info: JobInfo) -> Turnaround | None:
    """`turnaround` of a job, its events read through the gateway: the last `started` and
    the first `tracked`, each one read by subject (a job's other events are never read)."""
    if _time(info.labels.get(SAVED_AT)) is None:
        return None
    try:
        pages = [
            await reads.events(job_id=info.job_id, kind="started", last=True),
            await reads.events(job_id=info.job_id, kind="tracked", limit=1),
        ]
        stored = [bytes(page.events[0].event) for page in pages if page.events]
    except EvalqError as exc:
        # The record is what was asked for: shown all the same, with the parts the events give unknown.
        log.warning("the events of job %s could not be read (%s): its load and logging are unknown", info.job_id, exc)
        stored = []
    events = []
    for data in stored:
        if data:
            try:
                events.append(decode_event(data))
            except msgspec.DecodeError:
                continue  # written by something else on the subject: that part stays unknown
    return turnaround(info, events)
