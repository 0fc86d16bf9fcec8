"""How a job is split into pieces: pure functions, tested without NATS or lmms-eval.

A job with `shards = N` is split into at most N pieces. First by task, one piece per task;
when N allows more, the largest tasks are split into contiguous document ranges
(lmms-eval's `--offset` and `--limit`), always splitting the task whose pieces are largest
now, so the pieces come out as even as the tasks allow. With fewer pieces than tasks,
tasks are packed whole into the pieces, largest first into the lightest piece.

Pieces are listed largest first: the pieces stream hands them out in that order, so the
longest piece never starts last.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from .schemas import Piece

__all__ = ["plan_pieces"]


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
        Piece(
            index=index,
            tasks=[name],
            offset=None if name in whole else offset,
            limit=None if name in whole else limit,
            docs=size,
        )
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
    return [
        Piece(index=index, tasks=names, offset=None, limit=None, docs=load)
        for index, (load, _, names) in enumerate(filled)
    ]
