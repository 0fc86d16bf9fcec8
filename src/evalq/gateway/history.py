"""The job history index behind `<prefix>.jobs`: every job's summary, in memory, kept sorted.

The jobs bucket is the source of truth, and a KV scan is O(jobs) per request; so each
gateway reads the bucket once (the last value of every key, with an ordered consumer) and
then follows it: every record change is a compare-and-set write to the bucket, so the
watch sees each state a job passes through. A query walks one sorted list from the
cursor, or sorts the smallest matching set first when a filter is selective
(docs/DESIGN.md, "Job history").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import logging
import time
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js.kv import KeyValue

from ..errors import InvalidField, Unavailable
from ..follow import Follower
from ..schemas import TERMINAL, JobsPage, JobsQuery, JobSummary, Progress, encode

__all__ = ["History", "JobIndex", "select_metrics"]

log = logging.getLogger("evalq.gateway")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICRO = dt.timedelta(microseconds=1)
# A job's error is shown in a table cell; its full text stays in the record (`status`).
_ERROR_CHARS = 500
# A query whose smallest matching set is under this share of the time range sorts that set
# instead of walking the whole range.
_SELECTIVE = 8

Key = tuple[int, str]  # (created_at in microseconds since the epoch, job_id)


# The record's fields a summary needs, read leniently: a request stored before today's rules
# is still shown, and the rest of the record (request arguments, pieces) is skipped unread.
class _Request(msgspec.Struct):
    model: str | None = None
    tasks: list[str] = []
    priority: str = "normal"
    num_gpus: int = 1
    gate: str | None = None


class _Piece(msgspec.Struct):
    status: str = "queued"
    seconds: float | None = None


class _Result(msgspec.Struct):
    metrics: dict[str, dict[str, Any]] = {}
    duration_s: float | None = None


class _Verdict(msgspec.Struct):
    verdict: str


class _Record(msgspec.Struct):
    job_id: str
    status: str
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    request: _Request | None = None
    result: _Result | None = None
    error: str | None = None
    attempts: int = 0
    worker: str | None = None
    progress: Progress | None = None
    labels: dict[str, str] = {}
    pool: str = "default"
    shards: int = 1
    shards_done: int = 0
    team: str = "default"
    admitted_at: str | None = None
    stream_seq: int | None = None
    pieces: list[_Piece] = []
    verdict: _Verdict | None = None


_record = msgspec.json.Decoder(_Record)
_LIVE = ("queued", "running", "cancelling")
_STATUSES = frozenset({"queued", "running", "cancelling", "completed", "failed", "cancelled"})


def summarize(data: bytes) -> JobSummary:
    """A stored record's summary; raises msgspec errors for what is not a record."""
    r = _record.decode(data)
    if r.status not in _STATUSES:
        raise msgspec.ValidationError(f"unknown status {r.status!r}")
    error = r.error if r.error is None or len(r.error) <= _ERROR_CHARS else r.error[:_ERROR_CHARS] + "…"
    gpus = r.request.num_gpus if r.request else 1
    gpu_s = None
    if r.status in TERMINAL and r.started_at:
        if r.pieces:
            gpu_s = sum(p.seconds or 0.0 for p in r.pieces) * gpus
        elif r.completed_at:
            gpu_s = max(0.0, (micros(r.completed_at) - micros(r.started_at)) / 1e6) * gpus
    return JobSummary(
        job_id=r.job_id,
        status=r.status,  # type: ignore[arg-type]
        pool=r.pool,
        created_at=r.created_at,
        started_at=r.started_at,
        completed_at=r.completed_at,
        model=r.request.model if r.request else None,
        tasks=r.request.tasks if r.request else [],
        labels=r.labels,
        attempts=r.attempts,
        worker=r.worker,
        shards=r.shards,
        shards_done=r.shards_done,
        progress=r.progress,
        duration_s=r.result.duration_s if r.result else None,
        metrics=r.result.metrics if r.result else {},
        error=error,
        team=r.team,
        priority=r.request.priority if r.request else "normal",
        num_gpus=gpus,
        gpu_s=gpu_s,
        # A record that names its work message's sequence (written by a worker from the
        # message, or by a gateway before the scheduler) has its message in the work stream.
        admitted_at=r.admitted_at or (r.created_at if r.stream_seq is not None else None),
        pieces_waiting=sum(1 for p in r.pieces if p.status == "queued"),
        pieces_running=sum(1 for p in r.pieces if p.status == "running"),
        pieces_held=sum(1 for p in r.pieces if p.status == "held"),
        gate=r.request.gate if r.request else None,
        verdict=r.verdict.verdict if r.verdict else None,
    )


def micros(when: str | dt.datetime) -> int:
    """An RFC 3339 time as microseconds since the epoch; 0 for one that cannot be read."""
    try:
        value = dt.datetime.fromisoformat(when) if isinstance(when, str) else when
    except ValueError:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return (value - _EPOCH) // _MICRO


def select_metrics(metrics: dict[str, dict[str, Any]], wanted: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The metrics `wanted` names (`task/metric`, `task/*`, `*`). A metric named without its
    filter (`exact_match`) matches lmms-eval's keys for it (`exact_match,none`)."""
    wanted = list(wanted)
    if "*" in wanted:
        return metrics
    chosen: dict[str, dict[str, Any]] = {}
    for ref in wanted:
        task, _, name = ref.partition("/")
        values = metrics.get(task)
        if not values:
            continue
        if name == "*":
            chosen[task] = values
            continue
        for key, value in values.items():
            if key == name or key.partition(",")[0] == name:
                chosen.setdefault(task, {})[key] = value
    return chosen


def encode_cursor(key: Key) -> str:
    return base64.urlsafe_b64encode(f"{key[0]}:{key[1]}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Key:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, job_id = text.partition(":")
        return int(stamp), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidField("not a cursor this endpoint gave out", path="$.cursor") from None


class _Entry:
    __slots__ = ("key", "revision", "summary")

    def __init__(self, key: Key, revision: int, summary: JobSummary) -> None:
        self.key = key
        self.revision = revision
        self.summary = summary


class JobIndex:
    """Job summaries by id, one list sorted by (created_at, job_id), a sorted list of ids for
    prefixes, and the set of ids per status, pool, team and label for selective filters."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._order: list[Key] = []
        self._ids: list[str] = []
        self._by_status: dict[str, set[str]] = {}
        self._by_pool: dict[str, set[str]] = {}
        self._by_team: dict[str, set[str]] = {}
        self._by_label: dict[tuple[str, str], set[str]] = {}
        self._spent: dict[str, dict[str, JobSummary]] = {}  # pool -> finished jobs with GPU use
        self.version = 0  # counts changes, so a plan made from the index knows it is stale

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, status: str) -> int:
        """How many jobs are in `status`."""
        return len(self._by_status.get(status, ()))

    def get(self, job_id: str) -> JobSummary | None:
        entry = self._entries.get(job_id)
        return entry.summary if entry else None

    def pools(self) -> list[str]:
        return sorted(self._by_pool)

    def pool_status_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs each (pool, status) holds."""
        return {
            (pool, status): len(ids & members)
            for pool, ids in self._by_pool.items()
            for status, members in self._by_status.items()
            if not ids.isdisjoint(members)
        }

    def queued_in(self, pool: str) -> Counter[str]:
        """How many jobs each team has queued in `pool` (admitted or waiting)."""
        ids = self._by_pool.get(pool, set())
        return Counter(self._entries[i].summary.team for i in self._by_status.get("queued", ()) if i in ids)

    def live(self, pool: str) -> list[JobSummary]:
        """The queued and running jobs of `pool`."""
        ids = self._by_pool.get(pool, set())
        return [self._entries[i].summary for s in _LIVE for i in self._by_status.get(s, ()) if i in ids]

    def scheduled(self, pool: str) -> list[JobSummary]:
        """What the scheduler weighs in `pool`: its queued and running jobs, and its finished
        ones that used the pool (their use decays; `scheduling.PoolView`)."""
        return self.live(pool) + list(self._spent.get(pool, {}).values())

    # --- changes --------------------------------------------------------------------------

    def put(self, summary: JobSummary, revision: int) -> None:
        """Keep `summary` unless a later revision of the job is kept already."""
        job_id = summary.job_id
        if summary.status == "queued" and summary.admitted_at is None:
            # Nothing rewrites a record between its create and its admission: this revision
            # is its create's, the order in which the jobs were submitted.
            summary = msgspec.structs.replace(summary, stream_seq=revision)
        old = self._entries.get(job_id)
        if old is not None:
            if old.revision >= revision:
                return
            self._unlink(old)
        else:
            insort(self._ids, job_id)
        entry = _Entry((micros(summary.created_at), job_id), revision, summary)
        self._entries[job_id] = entry
        self._link(entry)
        self.version += 1

    def remove(self, job_id: str, revision: int) -> None:
        old = self._entries.get(job_id)
        if old is None or old.revision >= revision:
            return
        self._unlink(old)
        del self._entries[job_id]
        self.version += 1
        at = bisect_left(self._ids, job_id)
        if at < len(self._ids) and self._ids[at] == job_id:
            del self._ids[at]

    def _link(self, entry: _Entry) -> None:
        if not self._order or self._order[-1] < entry.key:
            self._order.append(entry.key)  # the usual case: a new job is the newest
        else:
            insort(self._order, entry.key)
        s = entry.summary
        self._by_status.setdefault(s.status, set()).add(s.job_id)
        self._by_pool.setdefault(s.pool, set()).add(s.job_id)
        self._by_team.setdefault(s.team, set()).add(s.job_id)
        for pair in s.labels.items():
            self._by_label.setdefault(pair, set()).add(s.job_id)
        if s.gpu_s:
            self._spent.setdefault(s.pool, {})[s.job_id] = s

    def _unlink(self, entry: _Entry) -> None:
        at = bisect_left(self._order, entry.key)
        if at < len(self._order) and self._order[at] == entry.key:
            del self._order[at]
        s = entry.summary
        _discard(self._by_status, s.status, s.job_id)
        _discard(self._by_pool, s.pool, s.job_id)
        _discard(self._by_team, s.team, s.job_id)
        for pair in s.labels.items():
            _discard(self._by_label, pair, s.job_id)
        self._spent.get(s.pool, {}).pop(s.job_id, None)

    # --- queries --------------------------------------------------------------------------

    def page(self, query: JobsQuery, *, max_bytes: int = 1 << 20) -> JobsPage:
        """One page, newest first, at most `query.limit` jobs and about `max_bytes` encoded."""
        jobs: list[JobSummary] = []
        size, last = 64, None
        matches = self._matches(query)
        for entry in matches:
            summary = entry.summary
            summary = msgspec.structs.replace(summary, metrics=select_metrics(summary.metrics, query.metrics))
            size += len(encode(summary)) + 1
            if jobs and (len(jobs) == query.limit or size > max_bytes):
                return JobsPage(jobs=jobs, next_cursor=encode_cursor(last.key) if last else None)
            jobs.append(summary)
            last = entry
        return JobsPage(jobs=jobs, next_cursor=None)

    def _matches(self, query: JobsQuery) -> Iterator[_Entry]:
        """Entries matching every filter, newest first, after the cursor."""
        lo, hi = 0, len(self._order)
        if query.created_after is not None:
            lo = bisect_left(self._order, (micros(query.created_after), ""))
        if query.created_before is not None:
            hi = bisect_left(self._order, (micros(query.created_before), ""))
        if query.cursor is not None:
            hi = min(hi, bisect_left(self._order, decode_cursor(query.cursor)))
        if lo >= hi:
            return
        statuses = frozenset(query.status)
        labels = list(query.labels.items())

        def keep(s: JobSummary) -> bool:
            return (
                (not statuses or s.status in statuses)
                and (query.pool is None or s.pool == query.pool)
                and (query.team is None or s.team == query.team)
                and all(s.labels.get(k) == v for k, v in labels)
                and (query.id_prefix is None or s.job_id.startswith(query.id_prefix))
            )

        candidates = self._candidates(query)
        if candidates is not None and len(candidates) * _SELECTIVE < hi - lo:
            low, high = self._order[lo], self._order[hi - 1]
            keys = sorted(k for k in (self._entries[j].key for j in candidates) if low <= k <= high)
            for key in reversed(keys):
                yield self._entries[key[1]]
            return
        for at in range(hi - 1, lo - 1, -1):
            entry = self._entries[self._order[at][1]]
            if keep(entry.summary):
                yield entry

    def _candidates(self, query: JobsQuery) -> set[str] | None:
        """The ids every set-shaped filter allows (status, pool, team, labels, prefix); None if none is given.

        Each filter is a union of sets (several statuses) or one set; the intersection starts
        from the smallest, so it costs about that filter's size, in C.
        """
        groups: list[list[AbstractSet[str]]] = []
        if query.status:
            groups.append([self._by_status.get(s, _NONE) for s in set(query.status)])
        if query.pool is not None:
            groups.append([self._by_pool.get(query.pool, _NONE)])
        if query.team is not None:
            groups.append([self._by_team.get(query.team, _NONE)])
        groups.extend([self._by_label.get(pair, _NONE)] for pair in query.labels.items())
        if query.id_prefix is not None:
            groups.append([set(self._with_prefix(query.id_prefix))])
        if not groups:
            return None
        groups.sort(key=lambda group: sum(map(len, group)))
        found: set[str] = set().union(*groups[0])
        for group in groups[1:]:
            if not found:
                break
            found = set().union(*(found & members for members in group)) if len(group) > 1 else found & group[0]
        return found

    def _with_prefix(self, prefix: str) -> list[str]:
        at = bisect_left(self._ids, prefix)
        found = []
        while at < len(self._ids) and self._ids[at].startswith(prefix):
            found.append(self._ids[at])
            at += 1
        return found


_NONE: frozenset[str] = frozenset()


def _discard(sets: dict[Any, set[str]], key: Any, job_id: str) -> None:
    members = sets.get(key)
    if members is not None:
        members.discard(job_id)
        if not members:
            del sets[key]


class History(Follower):
    """A JobIndex that follows the jobs bucket. `start()` waits for the first load only up
    to `wait` seconds; until it is done, queries get 503 (a partial history would call an
    ambiguous short id unique)."""

    what = "job history"

    def __init__(self, kv: KeyValue, *, nc: Client | None = None, retry: float = 1.0) -> None:
        super().__init__(kv, nc=nc, retry=retry)
        self.index = JobIndex()
        self.read = 0  # records read by the load under way
        self.pending: int | None = None  # records it has still to read, as last reported
        self.load_seconds: float | None = None
        # Set on every change the watch brings, for the dispatcher to wake on.
        self.changed = asyncio.Event()
        self._reached = asyncio.Event()
        self.revision = 0
        # Jobs seen cancelled before they were admitted (no work message whose taker would
        # publish a missing terminal event): job id -> when seen (monotonic).
        self.cancelled_waiting: dict[str, float] = {}  # the last bucket revision the watch brought
        # Completed jobs that name a gate and have no verdict yet, oldest first, and a flag
        # set when one is added (gateway/gatekeeper.py).
        self.ungated: dict[str, None] = {}
        # Told of each record the watch brings once loaded, with the summary it replaces
        # (gateway/gauges.py observes starts and ends).
        self.observers: list[Callable[[JobSummary | None, JobSummary], None]] = []
        self.gates_due = asyncio.Event()

    def note(self, summary: JobSummary, revision: int) -> None:
        """A record this gateway wrote: shown at once, before the watch brings it back."""
        self.index.put(summary, revision)
        self.changed.set()

    async def caught_up(self, revision: int, timeout: float) -> None:
        """Wait until the watch has brought the bucket up to `revision` (bounded)."""
        deadline = time.monotonic() + timeout
        while self.revision < revision and time.monotonic() < deadline:
            self._reached.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reached.wait(), max(0.0, deadline - time.monotonic()))

    def page(self, query: JobsQuery, *, max_bytes: int) -> JobsPage:
        return self._loaded().page(query, max_bytes=max_bytes)

    def counts(self, statuses: Iterable[str]) -> dict[str, int]:
        """How many jobs the history holds in each of `statuses`."""
        index = self._loaded()
        return {status: index.count(status) for status in statuses}

    def _loaded(self) -> JobIndex:
        if not self.loaded.is_set():
            left = "" if self.pending is None else f" ({self.read} read, {self.pending} to go)"
            raise Unavailable(f"this gateway is still loading the job history{left}; retry in a moment")
        return self.index

    async def follow(self) -> None:
        started = time.monotonic()
        fresh = JobIndex()
        self.read, self.pending = 0, None
        target = fresh
        async for entry in self.entries():
            if entry is None:  # every stored record has been read
                self.index = target = fresh
                self.load_seconds = time.monotonic() - started
                self.loaded.set()
                log.info("job history: %d jobs loaded in %.2fs", len(fresh), self.load_seconds)
                continue
            if target is fresh and not self.loaded.is_set():
                self.read += 1
                self.pending = entry.delta
            self.revision = max(self.revision, entry.revision or 0)
            self._reached.set()
            self.changed.set()
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                target.remove(entry.key, entry.revision or 0)
                continue
            try:
                summary = summarize(entry.value)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("job history: record %s is unreadable (%s); not listed", entry.key, exc)
                continue
            before = target.get(summary.job_id) if self.loaded.is_set() else None
            target.put(summary, entry.revision or 0)
            if self.loaded.is_set():
                for observe in self.observers:
                    try:
                        observe(before, summary)
                    except Exception:  # a view's fault must not stop the history
                        log.exception("job history: an observer failed")
            if summary.status == "completed" and summary.gate and not summary.verdict:
                self.ungated[summary.job_id] = None
                self.gates_due.set()
            else:
                self.ungated.pop(summary.job_id, None)
            if self.loaded.is_set() and summary.status == "cancelled" and not summary.admitted_at:
                self.cancelled_waiting.setdefault(summary.job_id, time.monotonic())
