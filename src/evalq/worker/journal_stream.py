"""An evaluation's response journal, on the worker's side: JetStream keeps it.

The evaluation process appends what it computes (each model response, each document's
scores) as frames to `DIR/journal.bin` (`journal_hooks.py`); it cannot reach NATS, and needs
no credentials. The worker tails that file and publishes each frame, as it is, to
`<prefix>.journal.<job>.<part>` (`part`: `whole`, or a piece `p<index>`) in the journal
stream; a frame is a message, so the journal survives the worker and the server.

Before a run the worker reads the part's journal back and hands the evaluation what it
holds (`resume.pkl`), and, with the cache on, what the cache holds for the model
(`cache.pkl`). A journal starts with the identity of the model that wrote it: a journal
written by another model (a checkpoint folder overwritten between attempts) is not resumed.

A failed or cancelled job's journal is removed (a rollup: one empty message replaces the
part's frames); a completed job's is kept for the journal stream's max age, for re-scoring,
and its cacheable responses are copied to `<prefix>.cache.<model identity>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client

from .. import jetstream
from ..schemas import CacheMode, Work
from ..topology import Topology
from .journal import (
    CACHE_FILE,
    RESUME_FILE,
    SETTINGS_FILE,
    cache_from,
    is_cacheable_record,
    read_frames,
    resume_from,
    safe_loads,
)

__all__ = ["WHOLE", "Journal", "JournalRun", "part_name"]

log = logging.getLogger("evalq.worker")

WHOLE = "whole"
# A message's payload stays under the server's default max_payload (1 MiB).
_MAX_FRAME = 900 * 1024
# Journals and caches are read one message at a time: bounded, so a runaway subject ends.
_MAX_MESSAGES = 1_000_000
_META = "meta"


def encode_frame(records: list[Any]) -> bytes:
    return pickle.dumps(records, protocol=4)


def decode_frame(data: bytes) -> list[Any]:
    """A frame as the evaluation wrote it, read with the allow-list unpickler: a planted
    message cannot run code in the worker."""
    records = safe_loads(data)
    if not isinstance(records, list):
        raise ValueError("a journal message holds no list of records")
    return records


def part_name(piece: int | None) -> str:
    return WHOLE if piece is None else f"p{piece}"


class Journal:
    """The journal and cache streams, as the worker reads and writes them."""

    def __init__(self, nc: Client, topology: Topology, *, timeout: float) -> None:
        self.nc = nc
        self.topology = topology
        self.timeout = timeout
        self.api = jetstream.Api.of(nc, timeout=timeout)

    async def _frames(self, stream: str, subject: str) -> AsyncIterator[bytes]:
        seq = 1
        for _ in range(_MAX_MESSAGES):
            stored = await jetstream.msg_get_next(self.api, stream, seq, subject)
            if stored is None:
                return
            seq = stored.seq + 1
            if stored.data:  # an empty message is a removal's rollup
                yield stored.data

    async def read(self, job_id: str, part: str) -> list[Any]:
        """The records of one part's journal (`>`: every part's), in the order written."""
        records: list[Any] = []
        subject = self.topology.journal_subject(job_id, part)
        async for data in self._frames(self.topology.journal_stream, subject):
            records.extend(decode_frame(data))
        return records

    async def _publish(self, subject: str, records: list[Any], headers: dict[str, str] | None = None) -> None:
        for payload in _frames_of(records):
            write = jetstream.Write(subject, payload, headers)
            await jetstream.publish(self.nc, write, timeout=self.timeout)

    async def append(self, job_id: str, part: str, records: list[Any]) -> None:
        await self._publish(self.topology.journal_subject(job_id, part), records)

    async def remove(self, job_id: str, parts: Iterable[str]) -> None:
        """Remove the parts' journals: one empty rollup message replaces each one's frames."""
        for part in parts:
            write = jetstream.Write(self.topology.journal_subject(job_id, part), b"", {"Nats-Rollup": "sub"})
            await jetstream.publish(self.nc, write, timeout=self.timeout)

    async def cached(self, model: str) -> list[Any]:
        records: list[Any] = []
        async for data in self._frames(self.topology.cache_stream, self.topology.cache_subject(model)):
            records.extend(decode_frame(data))
        return records

    async def add_to_cache(self, model: str, records: list[Any]) -> None:
        if records:
            await self._publish(self.topology.cache_subject(model), records)


def _frames_of(records: list[Any]) -> Iterable[bytes]:
    """The records as frames under the message size: a record too large for one is skipped
    (logged): the journal then lacks it, and a resume computes it again."""
    whole = encode_frame(records)
    if len(whole) <= _MAX_FRAME:  # an evaluation's frame as it wrote it: no record is sized alone
        yield whole
        return
    batch: list[Any] = []
    size = 0
    for record in records:
        one = len(pickle.dumps(record, protocol=4))
        if one > _MAX_FRAME:
            log.warning("a journal record of %d bytes is too large to keep; it is not journaled", one)
            continue
        if batch and size + one > _MAX_FRAME:
            yield encode_frame(batch)
            batch, size = [], 0
        batch.append(record)
        size += one
    if batch:
        yield encode_frame(batch)


class JournalRun:
    """One evaluation's journal: prepared before the launch, tailed while it runs, kept,
    cached or removed after it."""

    def __init__(
        self,
        journal: Journal,
        *,
        job_id: str,
        part: str,
        model: str,
        directory: Path,
        cache: CacheMode,
        settings: dict[str, Any],
        rescore_of: str | None = None,
        interval: float = 1.0,
    ) -> None:
        self.journal = journal
        self.job_id = job_id
        self.part = part
        self.model = model
        self.directory = directory
        self.cache = cache
        self.settings = settings
        self.rescore_of = rescore_of
        self.interval = interval
        # Each rank's journal file (`journal.bin`, `journal.rank<N>.bin`), and how far it is published.
        self.offsets: dict[Path, int] = {}
        self.resumed_responses = 0
        self.resumed_scores = 0
        # The cache's (fingerprint, occurrence) pairs already held: not added again.
        self._in_cache: set[tuple[Any, Any]] = set()
        # The part's cacheable answers (earlier attempts' and this one's, as published): what
        # a completed evaluation adds to the cache, without reading its journal back.
        self._cacheable: list[Any] = []
        self._lock = asyncio.Lock()

    def flags(self) -> list[str]:
        flags = [f"--evalq_journal={self.directory}"]
        return [*flags, "--evalq_rescore"] if self.rescore_of is not None else flags

    async def prepare(self) -> None:
        """Write what the evaluation starts from: its earlier attempts' records, the cache's
        answers for its model, and its settings. Raises `EvalqError`-free OSError/NATS errors."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / SETTINGS_FILE).write_text(json.dumps(self.settings))
        if self.rescore_of is not None:
            records = await self.journal.read(self.rescore_of, ">")
            responses = [record for record in records if record and record[0] == "response"]
            if not responses:
                raise FileNotFoundError(f"job {self.rescore_of} has no recorded responses (its journal expired?)")
            _dump(self.directory / RESUME_FILE, resume_from(responses))
            self.resumed_responses = len(responses)
            await self.journal.append(self.job_id, self.part, [(_META, self.model)])
            return
        records = await self.journal.read(self.job_id, self.part)
        if records and records[0] != (_META, self.model):
            log.warning(
                "job %s: its journal was written by another model (rewritten since?); starting afresh", self.job_id
            )
            await self.journal.remove(self.job_id, [self.part])
            records = []
        if records:
            kept = records[1:]
            self._cacheable = [record for record in kept if is_cacheable_record(record)]
            _dump(self.directory / RESUME_FILE, resume_from(kept))
            self.resumed_responses = sum(1 for record in kept if record[0] == "response")
            self.resumed_scores = sum(1 for record in kept if record[0] == "score")
        else:
            await self.journal.append(self.job_id, self.part, [(_META, self.model)])
        if self.cache in ("read", "read-write"):
            cached = await self.journal.cached(self.model)
            answers = cache_from(cached)
            self._in_cache = set(answers)
            if answers:
                _dump(self.directory / CACHE_FILE, answers)

    async def publish_new(self) -> None:
        """Publish the frames the evaluation has written since the last call."""
        async with self._lock:
            for path in sorted(self.directory.glob("journal*.bin")):
                frames, offset = await asyncio.to_thread(read_frames, path, self.offsets.get(path, 0))
                for records in frames:
                    await self.journal.append(self.job_id, self.part, records)
                    self._cacheable += [record for record in records if is_cacheable_record(record)]
                self.offsets[path] = offset

    async def tail(self) -> None:
        """Publish new frames every `interval` until cancelled; a failed publish is retried
        at the next round (the frames stay in the file)."""
        while True:
            await asyncio.sleep(self.interval)  # the tail's own pace, not a synchronisation
            try:
                await self.publish_new()
            except (OSError, msgspec.DecodeError, pickle.UnpicklingError) as exc:
                log.warning("job %s: journal not read: %s", self.job_id, exc)
            except Exception as exc:  # NATS unreachable: the next round tries again
                log.warning("job %s: journal not published: %s", self.job_id, exc)

    def work(self) -> Work | None:
        """What the evaluation computed and took from elsewhere: its ranks' `counts*.json`, summed."""
        totals: dict[str, int] = {}
        for path in sorted(self.directory.glob("counts*.json")):
            with contextlib.suppress(OSError, ValueError):
                counts = json.loads(path.read_text())
                for name in Work.__struct_fields__:
                    totals[name] = totals.get(name, 0) + int(counts.get(name, 0))
        return Work(**totals) if totals else None

    async def completed(self) -> None:
        """The evaluation completed: publish its last frames and add its cacheable answers
        (this attempt's and earlier ones') to the cache."""
        await self.publish_new()
        if self.cache in ("read-write", "refresh"):
            held = set() if self.cache == "refresh" else self._in_cache
            await self.journal.add_to_cache(self.model, [r for r in self._cacheable if (r[2], r[3]) not in held])


def _dump(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        pickle.dump(value, handle, protocol=4)
    tmp.replace(path)
