"""A sharded job's pieces: how a job is split into them, and how each one changes.
Pure functions, tested without NATS or lmms-eval.

A job with `shards = N` is split into at most N pieces. First by task, one piece per task;
when N allows more, the largest tasks are split into contiguous document ranges
(lmms-eval's `--offset` and `--limit`), always splitting the task whose pieces are largest
now, so the pieces come out as even as the tasks allow. With fewer pieces than tasks,
tasks are packed whole into the pieces, largest first into the lightest piece.

A piece of whole tasks has no offset, and as its limit the largest count among its tasks.
lmms-eval applies one count to every task of a run (a fractional limit becomes the first
task's share, see `worker/entry.py`), so each task's count is min(its documents,
that count), and this limit runs exactly the planned documents of each of the piece's
tasks, where the request's fraction, applied to the piece's tasks alone, would not.

Pieces are listed largest first: the pieces stream hands them out in that order, so the
longest piece never starts last.

A team with a `max_running_gpus` quota has its pieces planned `held`: nothing is published
for them, and the gateway's dispatcher releases them (`release`: `queued`, then their
messages) as the quota has room, as it admits the team's jobs.

A sharded job is `running` from the moment a worker starts planning it until its merge
ends it; its pieces live in its record, so every piece change is a compare-and-set on
the same record as the job's own changes (`lifecycle.Recorder` applies them), and "all
done" or "none running" is read from one consistent record. Each change is a pure
function ``JobInfo -> JobInfo | None``, as the job's own changes in `lifecycle` are:
`PIECE_ALLOWED` is the table they consult.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Literal

import msgspec

from .jetstream import Write
from .schemas import JobInfo, Piece, PieceItem, PieceStatus, Progress, Work, encode
from .topology import Topology

__all__ = [
    "PIECE_ALLOWED",
    "PieceTransition",
    "all_pieces_done",
    "piece_allowed",
    "piece_cancel",
    "piece_fail",
    "piece_finish",
    "piece_progress",
    "piece_start",
    "piece_write",
    "pieces_running",
    "pieces_work",
    "plan",
    "plan_pieces",
    "release",
]


def plan_pieces(doc_counts: Mapping[str, int], shards: int) -> list[Piece]:
    """The pieces of a job whose tasks have `doc_counts` documents (after its `limit`)."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    tasks = [(name, count) for name, count in doc_counts.items() if count > 0]
    if not tasks:
        raise ValueError("the job's tasks have no documents")
    # Largest first; the name breaks ties so that the same counts always give the same plan.
    tasks.sort(key=lambda item: (-item[1], item[0]))
    if shards <= len(tasks):
        return _pack(tasks, shards)
    # One piece per task, then one more piece at a time for the task whose pieces are
    # largest (never more pieces than documents).
    parts = {name: 1 for name, _ in tasks}
    heap: list[tuple[float, str, int]] = [(float(-count), name, count) for name, count in tasks]
    heapq.heapify(heap)
    for _ in range(shards - len(tasks)):
        while heap:
            _, name, count = heapq.heappop(heap)
            if parts[name] < count:
                parts[name] += 1
                heapq.heappush(heap, (-(count / parts[name]), name, count))
                break
        else:
            break  # every task is down to one document per piece
    pieces: list[tuple[int, str, int, int]] = []
    for name, count in tasks:
        k = parts[name]
        start = 0
        for i in range(k):
            size = count // k + (1 if i < count % k else 0)
            pieces.append((size, name, start, size))
            start += size
    pieces.sort(key=lambda p: (-p[0], p[1], p[2]))
    whole = {name for name, _ in tasks if parts[name] == 1}
    return [
        Piece(index=index, tasks=[name], offset=None if name in whole else offset, limit=limit, docs=size)
        for index, (size, name, offset, limit) in enumerate(pieces)
    ]


def _pack(tasks: list[tuple[str, int]], bins: int) -> list[Piece]:
    loads: list[tuple[int, int, list[str]]] = [(0, i, []) for i in range(bins)]
    heapq.heapify(loads)
    for name, count in tasks:
        load, i, names = heapq.heappop(loads)
        names.append(name)
        heapq.heappush(loads, (load + count, i, names))
    filled = sorted((item for item in loads if item[2]), key=lambda item: (-item[0], item[1]))
    counts = dict(tasks)
    return [
        Piece(index=index, tasks=names, offset=None, limit=max(counts[name] for name in names), docs=load)
        for index, (load, _, names) in enumerate(filled)
    ]


# --- the pieces' changes, as pure functions ---------------------------------------------

PieceTransition = Literal["piece_release", "piece_start", "piece_finish", "piece_fail", "piece_cancel"]
# (piece state, transition) -> the piece states it may lead to.
PIECE_ALLOWED: dict[tuple[PieceStatus, PieceTransition], frozenset[PieceStatus]] = {
    # Its team's quota has room now: its message goes out.
    ("held", "piece_release"): frozenset({"queued"}),
    ("held", "piece_cancel"): frozenset({"cancelled"}),
    ("queued", "piece_start"): frozenset({"running"}),
    # A redelivery: the worker that ran it stopped answering.
    ("running", "piece_start"): frozenset({"running"}),
    ("running", "piece_finish"): frozenset({"completed"}),
    # Back to the queue for another attempt, or failed for good (and the job with it).
    ("running", "piece_fail"): frozenset({"queued", "failed"}),
    ("queued", "piece_cancel"): frozenset({"cancelled"}),
    ("running", "piece_cancel"): frozenset({"cancelled"}),
}
# The job states in which each piece change may happen: pieces start and report only
# while the job runs; a piece that ends may still say so while the job is being cancelled.
_JOB_STATES_FOR: dict[PieceTransition, frozenset[str]] = {
    "piece_release": frozenset({"running"}),
    "piece_start": frozenset({"running"}),
    "piece_finish": frozenset({"running", "cancelling"}),
    "piece_fail": frozenset({"running", "cancelling"}),
    "piece_cancel": frozenset({"running", "cancelling", "failed", "cancelled"}),
}


def piece_allowed(info: JobInfo, index: int, transition: PieceTransition) -> frozenset[PieceStatus]:
    if info.status not in _JOB_STATES_FOR[transition] or not 0 <= index < len(info.pieces):
        return frozenset()
    return PIECE_ALLOWED.get((info.pieces[index].status, transition), frozenset())


def _with_piece(info: JobInfo, index: int, piece: Piece) -> JobInfo:
    pieces = list(info.pieces)
    pieces[index] = piece
    done = sum(1 for p in pieces if p.status == "completed")
    return msgspec.structs.replace(info, pieces=pieces, shards_done=done, progress=_pieces_progress(pieces))


def _pieces_progress(pieces: list[Piece]) -> Progress:
    done = sum(p.docs if p.status == "completed" else min(p.done, p.docs) for p in pieces)
    total = sum(p.docs for p in pieces) or 1
    return Progress(phase="documents", done=done, total=total, percent=round(100.0 * done / total, 1))


def plan(info: JobInfo, pieces: list[Piece], *, hold: bool = False) -> JobInfo | None:
    """Give a running job its pieces, once; `held` when its team's quota decides when they run."""
    if info.status != "running" or info.pieces or not pieces:
        return None
    if hold:
        pieces = [msgspec.structs.replace(p, status="held") for p in pieces]
    return msgspec.structs.replace(
        info, pieces=list(pieces), shards=len(pieces), shards_done=0, progress=_pieces_progress(list(pieces))
    )


def release(info: JobInfo, active: int, *, at: str) -> JobInfo | None:
    """Release held pieces, first listed first, until `active` pieces are queued or running.

    A target rather than a count: the dispatcher computes it from a summary that may not show
    its own last release yet, and the same target applied twice releases nothing more."""
    now_active = sum(1 for p in info.pieces if p.status in ("queued", "running"))
    held = [p.index for p in info.pieces if p.status == "held"]
    chosen = held[: max(0, active - now_active)]
    if not chosen or any("queued" not in piece_allowed(info, i, "piece_release") for i in chosen):
        return None
    pieces = list(info.pieces)
    for i in chosen:
        pieces[i] = msgspec.structs.replace(pieces[i], status="queued", released_at=at)
    return msgspec.structs.replace(info, pieces=pieces)


def piece_start(info: JobInfo, index: int, *, worker: str, at: str) -> JobInfo | None:
    if "running" not in piece_allowed(info, index, "piece_start"):
        return None
    piece = info.pieces[index]
    started = msgspec.structs.replace(
        piece, status="running", attempts=piece.attempts + 1, worker=worker, started_at=at, done=0, error=None
    )
    return _with_piece(info, index, started)


def piece_progress(info: JobInfo, index: int, done: int) -> JobInfo | None:
    if info.status != "running" or not 0 <= index < len(info.pieces) or info.pieces[index].status != "running":
        return None
    piece = info.pieces[index]
    # Later bars of the same run (post-processing) may count from zero again: never go back.
    return _with_piece(info, index, msgspec.structs.replace(piece, done=max(piece.done, min(done, piece.docs))))


def piece_finish(info: JobInfo, index: int, *, at: str, seconds: float, work: Work | None = None) -> JobInfo | None:
    if "completed" not in piece_allowed(info, index, "piece_finish"):
        return None
    piece = info.pieces[index]
    finished = msgspec.structs.replace(
        piece, status="completed", done=piece.docs, completed_at=at, seconds=seconds, work=work
    )
    return _with_piece(info, index, finished)


def pieces_work(info: JobInfo) -> Work | None:
    """A sharded job's work: its pieces', summed (the merge computes nothing: every score it
    hands lmms-eval is a piece's); None when no piece reported any."""
    works = [piece.work for piece in info.pieces if piece.work is not None]
    if not works:
        return None
    fields = Work.__struct_fields__
    return Work(**{name: sum(getattr(work, name) for work in works) for name in fields})


def piece_fail(info: JobInfo, index: int, *, error: str, final: bool, at: str) -> JobInfo | None:
    """A piece's attempt failed: back to `queued` for the next attempt, or `failed` when `final`."""
    target: PieceStatus = "failed" if final else "queued"
    if target not in piece_allowed(info, index, "piece_fail"):
        return None
    piece = msgspec.structs.replace(
        info.pieces[index], status=target, error=error, done=0, worker=None, completed_at=at if final else None
    )
    return _with_piece(info, index, piece)


def piece_cancel(info: JobInfo, index: int, *, at: str) -> JobInfo | None:
    if "cancelled" not in piece_allowed(info, index, "piece_cancel"):
        return None
    return _with_piece(info, index, msgspec.structs.replace(info.pieces[index], status="cancelled", completed_at=at))


def piece_write(topology: Topology, pool: str, item: PieceItem) -> Write:
    """A message of the pieces stream; its id makes a re-publication (a redelivered plan, a
    release published again, a piece completed twice) a no-op."""
    merge = item.step == "merge"
    return Write(
        topology.piece_subject(pool, item.job_id, "merge" if merge else str(item.index)),
        encode(item),
        {"Nats-Msg-Id": f"{item.job_id}.merge" if merge else f"{item.job_id}.piece.{item.index}"},
        stream=topology.pieces_stream(pool),
    )


def pieces_running(info: JobInfo) -> list[int]:
    return [p.index for p in info.pieces if p.status == "running"]


def all_pieces_done(info: JobInfo) -> bool:
    return bool(info.pieces) and all(p.status == "completed" for p in info.pieces)
