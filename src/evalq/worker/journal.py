"""A run's journal: the model's responses and the task's scores, written as the run goes.

An evaluation process started with `--evalq_journal=DIR` (see `entry.py`) reads and writes
these files in DIR; the worker writes the inputs before the run and tails the output:

- `settings.json` (input, every key optional): `flush_count` (256) and `flush_seconds`
  (5.0) bound what a kill can lose, `chunk` (32) is how many requests the model is given
  at a time, `seed` (false) says the request names a seed, so sampled answers may be cached.
- `resume.pkl` (input): `{"responses": {(key, fp, n): answer}, "scores": {(score_key,
  results_fp): value}}` from the job's own earlier journal (`resume_from`).
- `cache.pkl` (input): `{(fp, n): answer}` from other jobs' cacheable responses (`cache_from`).
- `journal.bin` (output, append only): frames, each a 4-byte big-endian length and a
  pickle (protocol 4) of a list of records, each frame under `FRAME_BYTES` unless one
  record alone is larger. `read_frames` returns the complete frames only: a frame torn by
  a kill is not one until its last byte is there.
- `counts.json` (output, replaced whole at each frame and at the end): how many responses
  were computed, resumed and reused, how many scores computed and reused, and whether a
  model was loaded.

Records are tuples: `("response", key, fp, n, answer, cacheable)` and `("score",
score_key, results_fp, value)`. `key` is `lmms_hooks.request_key`'s (request type, task,
document, index), `n` the occurrence of that key in the run (0 to repeats - 1), `fp` the
request's fingerprint (`fingerprint.py`; None where it could not be taken), `score_key`
`lmms_hooks.ScoreKey`, `results_fp` the fingerprint of what `process_results` was given.

With several ranks (accelerate), rank R > 0 writes `journal.rankR.bin` and
`counts.rankR.json` beside rank 0's files: one writer per file.

Every pickle read here goes through an allow-list unpickler (`safe_load`): plain values,
numpy scalars and arrays, lmms-eval's `GenerationResult`; any other class is refused, so a
planted file cannot run code. A record that would be refused is not written at all, so
the journal stays readable whatever a task returns.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_FILE",
    "COUNTS_FILE",
    "FRAME_BYTES",
    "JOURNAL_FILE",
    "RESUME_FILE",
    "SETTINGS_FILE",
    "Counts",
    "JournalSettings",
    "JournalWriter",
    "Record",
    "Resume",
    "SafeUnpickler",
    "cache_from",
    "is_cacheable_record",
    "journal_paths",
    "load_cache",
    "load_resume",
    "read_frames",
    "resume_from",
    "safe_load",
    "safe_loads",
]

SETTINGS_FILE = "settings.json"
RESUME_FILE = "resume.pkl"
CACHE_FILE = "cache.pkl"
JOURNAL_FILE = "journal.bin"
COUNTS_FILE = "counts.json"
# A frame is published as one message: kept well under a message's usual size limit.
FRAME_BYTES = 512 * 1024

_LENGTH = struct.Struct(">I")

Record = tuple[Any, ...]
Fingerprint = str | None


class SafeUnpickler(pickle.Unpickler):
    """Responses and scores are plain values (strings, numbers, tuples, lists, dicts, numpy
    scalars and arrays, lmms-eval's `GenerationResult`); any other class is refused, so a
    planted file cannot run code."""

    _ALLOWED = {
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # A score may be an array: its data is rebuilt from bytes, never by a call it names.
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        # What lmms-eval's own models return from generate_until: plain dataclasses of data.
        ("lmms_eval.api.instance", "GenerationResult"),
        ("lmms_eval.api.instance", "TokenCounts"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a recorded value of type {module}.{name} is not replayed")


def safe_loads(data: bytes) -> Any:
    return SafeUnpickler(io.BytesIO(data)).load()


def safe_load(path: Path) -> Any:
    with open(path, "rb") as handle:
        return SafeUnpickler(handle).load()


@dataclass(frozen=True)
class JournalSettings:
    flush_count: int = 256
    flush_seconds: float = 5.0
    chunk: int = 32
    seed: bool = False

    @classmethod
    def read(cls, directory: Path) -> JournalSettings:
        path = directory / SETTINGS_FILE
        if not path.is_file():
            return cls()
        given = json.loads(path.read_text())
        if not isinstance(given, dict):
            raise ValueError(f"{path} holds no object")
        default = cls()
        settings = cls(
            flush_count=int(given.get("flush_count", default.flush_count)),
            flush_seconds=float(given.get("flush_seconds", default.flush_seconds)),
            chunk=int(given.get("chunk", default.chunk)),
            seed=bool(given.get("seed", default.seed)),
        )
        if settings.flush_count < 1 or settings.chunk < 1 or settings.flush_seconds < 0:
            raise ValueError(f"{path}: flush_count and chunk must be at least 1, flush_seconds not negative")
        return settings


@dataclass
class Resume:
    """What a run may take from the job's own earlier journal instead of computing it."""

    responses: dict[tuple[Any, Fingerprint, int], Any] = field(default_factory=dict)
    scores: dict[tuple[Any, Fingerprint], Any] = field(default_factory=dict)


def resume_from(records: Iterable[Record]) -> dict[str, dict[Any, Any]]:
    """The contents of `resume.pkl` from a job's journal records, in the order they were
    written (a later record of the same request or score replaces an earlier one)."""
    responses: dict[Any, Any] = {}
    scores: dict[Any, Any] = {}
    for record in records:
        if record[0] == "response":
            _, key, fp, n, answer, _cacheable = record
            responses[(tuple(key), fp, n)] = answer
        elif record[0] == "score":
            _, score_key, results_fp, value = record
            scores[(tuple(score_key), results_fp)] = value
    return {"responses": responses, "scores": scores}


def is_cacheable_record(record: Record) -> bool:
    """Whether a journal record is a response the cache may hold: marked cacheable, with a
    fingerprint to find it by."""
    return record[0] == "response" and bool(record[5]) and record[2] is not None


def cache_from(records: Iterable[Record]) -> dict[tuple[str, int], Any]:
    """The contents of `cache.pkl` from journal records: the cacheable responses, by
    (fingerprint, occurrence)."""
    cache: dict[tuple[str, int], Any] = {}
    for record in records:
        if is_cacheable_record(record):
            _, _key, fp, n, answer, _cacheable = record
            cache[(fp, n)] = answer
    return cache


def load_resume(directory: Path) -> Resume:
    path = directory / RESUME_FILE
    if not path.is_file():
        return Resume()
    loaded = safe_load(path)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("responses"), dict):
        raise ValueError(f"{path} holds no responses")
    scores = loaded.get("scores", {})
    if not isinstance(scores, dict):
        raise ValueError(f"{path} holds no scores")
    return Resume(responses=loaded["responses"], scores=scores)


def load_cache(directory: Path) -> Mapping[tuple[str, int], Any]:
    path = directory / CACHE_FILE
    if not path.is_file():
        return {}
    loaded = safe_load(path)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds no responses")
    return loaded


def read_frames(path: Path, offset: int = 0) -> tuple[list[list[Record]], int]:
    """The complete frames of a journal from `offset` on, and the offset after the last of
    them. A frame still being written (or torn by a kill) is left for a later read."""
    frames: list[list[Record]] = []
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below; a missing file is no frame)
    except FileNotFoundError:
        return frames, offset
    with handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(offset)
        while offset + _LENGTH.size <= size:
            (length,) = _LENGTH.unpack(handle.read(_LENGTH.size))
            if offset + _LENGTH.size + length > size:
                break
            frame = safe_loads(handle.read(length))
            if not isinstance(frame, list):
                raise ValueError(f"{path}: the frame at {offset} holds no list of records")
            frames.append(frame)
            offset += _LENGTH.size + length
    return frames, offset


def _complete_length(path: Path) -> int:
    """How many bytes of the journal are complete frames."""
    offset = 0
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    with open(path, "rb") as handle:
        while offset + _LENGTH.size <= size:
            handle.seek(offset)
            (length,) = _LENGTH.unpack(handle.read(_LENGTH.size))
            if offset + _LENGTH.size + length > size:
                break
            offset += _LENGTH.size + length
    return offset


def journal_paths(directory: Path, rank: int = 0) -> tuple[Path, Path]:
    """The journal and counts files a rank writes."""
    if rank == 0:
        return directory / JOURNAL_FILE, directory / COUNTS_FILE
    return directory / f"journal.rank{rank}.bin", directory / f"counts.rank{rank}.json"


@dataclass
class Counts:
    responses_computed: int = 0
    responses_resumed: int = 0
    responses_reused: int = 0
    scores_computed: int = 0
    scores_reused: int = 0
    model_loaded: bool = False


class JournalWriter:
    """Buffers records and writes them as frames, from any thread (lmms-eval scores on
    several). A frame goes to the file in one `write` and is synced before the counts that
    include it are replaced."""

    def __init__(self, directory: Path, settings: JournalSettings, *, rank: int = 0) -> None:
        self.settings = settings
        self.path, self.counts_path = journal_paths(directory, rank)
        self.counts = Counts()
        self.refused: set[str] = set()
        self._lock = threading.Lock()
        self._holder: int | None = None
        self._buffer: list[Record] = []
        self._buffered_bytes = 0
        self._last_frame = time.monotonic()
        # (thread, call): made by that thread once it releases the lock, which a signal
        # handler found it holding.
        self._after_release: tuple[int, Callable[[], None]] | None = None
        # A run appending to an earlier run's journal first cuts off a frame torn by a kill:
        # frames appended after it would otherwise be read as its remainder.
        directory.mkdir(parents=True, exist_ok=True)
        complete = _complete_length(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size > complete:
            os.ftruncate(self._fd, complete)
        self._write_counts()

    # -- what other threads and the signal handler look at --------------------------------

    def held_here(self) -> bool:
        """This thread holds the lock (a signal handler interrupted it mid-write)."""
        return self._holder == threading.get_ident()

    def after_release(self, call: Callable[[], None]) -> None:
        """Make `call` once this thread, which holds the lock, releases it."""
        self._after_release = (threading.get_ident(), call)

    @contextlib.contextmanager
    def _locked(self, timeout: float = -1) -> Iterator[None]:
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError("the journal stayed locked")
        self._holder = threading.get_ident()
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()
        pending = self._after_release
        if pending is not None and pending[0] == threading.get_ident():
            self._after_release = None
            pending[1]()

    # -- records ------------------------------------------------------------------------

    def count(self, name: str, number: int = 1) -> None:
        with self._locked():
            setattr(self.counts, name, getattr(self.counts, name) + number)

    def set_model_loaded(self, loaded: bool) -> None:
        with self._locked():
            self.counts.model_loaded = loaded

    def add(self, record: Record) -> None:
        """Buffer one record; a frame is written now only when the buffer would grow past
        `FRAME_BYTES`. A record the journal's reader would refuse is not kept."""
        try:
            data = pickle.dumps(record, protocol=4)
            safe_loads(data)
        except Exception as exc:
            self._refuse(record, exc)
            return
        with self._locked():
            if self._buffer and self._buffered_bytes + len(data) > FRAME_BYTES:
                self._write_frame()
            self._buffer.append(record)
            self._buffered_bytes += len(data)
            if self._buffered_bytes > FRAME_BYTES:  # one record larger than a frame: alone in its own
                self._write_frame()

    def _refuse(self, record: Record, exc: Exception) -> None:
        what = f"{record[0]}: {type(exc).__name__}: {exc}"
        if what not in self.refused:
            self.refused.add(what)
            print(f"[evalq journal] a {record[0]} is not journaled ({what}); a resume computes it again", flush=True)

    def due(self) -> None:
        """Write a frame if `flush_count` records wait or `flush_seconds` passed since the last."""
        with self._locked():
            waited = time.monotonic() - self._last_frame
            if self._buffer and (
                len(self._buffer) >= self.settings.flush_count or waited >= self.settings.flush_seconds
            ):
                self._write_frame()

    def flush(self, timeout: float = -1) -> None:
        """Write whatever waits, and the counts."""
        with self._locked(timeout):
            if self._buffer:
                self._write_frame()
            else:
                self._write_counts()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()
        with self._locked():
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- with the lock held -----------------------------------------------------------------

    def _write_frame(self) -> None:
        if self._fd < 0:
            return
        payload = pickle.dumps(self._buffer, protocol=4)
        data = memoryview(_LENGTH.pack(len(payload)) + payload)
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
        os.fsync(self._fd)
        self._buffer = []
        self._buffered_bytes = 0
        self._last_frame = time.monotonic()
        self._write_counts()

    def _write_counts(self) -> None:
        tmp = self.counts_path.with_name(self.counts_path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self.counts)))
        tmp.replace(self.counts_path)
