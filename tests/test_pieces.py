"""Splitting a job into pieces, and the pieces' lifecycle: pure functions, without NATS."""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalq import lifecycle, sharding
from evalq.schemas import EvaluateRequest, JobInfo, Piece
from evalq.sharding import plan_pieces


def _covered(pieces: list[Piece], counts: dict[str, int]) -> dict[str, list[int]]:
    docs: dict[str, list[int]] = {name: [] for name in counts}
    for piece in pieces:
        for task in piece.tasks:
            if piece.offset is None:
                # Its limit, applied to each of its tasks, runs each task's planned documents.
                assert piece.limit == max(counts[name] for name in piece.tasks)
                docs[task] += list(range(min(counts[task], piece.limit)))
            else:
                assert piece.limit is not None and len(piece.tasks) == 1
                docs[task] += list(range(piece.offset, piece.offset + piece.limit))
    return docs


@given(
    counts=st.dictionaries(st.from_regex(r"\At[a-z]{1,4}\Z"), st.integers(1, 500), min_size=1, max_size=6),
    shards=st.integers(1, 256),
)
@settings(max_examples=300, deadline=None)
def test_every_document_is_in_exactly_one_piece(counts: dict[str, int], shards: int) -> None:
    pieces = plan_pieces(counts, shards)
    assert 1 <= len(pieces) <= shards
    assert [p.index for p in pieces] == list(range(len(pieces)))
    for task, docs in _covered(pieces, counts).items():
        assert sorted(docs) == list(range(counts[task])), f"{task}: a document missing or in two pieces"
    assert sum(p.docs for p in pieces) == sum(counts.values())
    assert all(a.docs >= b.docs for a, b in itertools.pairwise(pieces)), "largest pieces first"
    if shards >= len(counts):
        # One task per piece at least; a task is split only into near-equal ranges.
        assert len(pieces) == min(shards, sum(counts.values()))
        for task in counts:
            sizes = [p.docs for p in pieces if p.tasks == [task]]
            assert max(sizes) - min(sizes) <= 1


def test_the_largest_task_is_split_first() -> None:
    pieces = plan_pieces({"evalq_demo": 20, "evalq_shard_demo": 240}, 5)
    assert [(p.tasks, p.offset, p.limit) for p in pieces] == [
        (["evalq_shard_demo"], 0, 60),
        (["evalq_shard_demo"], 60, 60),
        (["evalq_shard_demo"], 120, 60),
        (["evalq_shard_demo"], 180, 60),
        (["evalq_demo"], None, 20),
    ]


def test_fewer_pieces_than_tasks_packs_whole_tasks() -> None:
    pieces = plan_pieces({"a": 5, "b": 7, "c": 1}, 2)
    assert [(p.tasks, p.docs, p.offset, p.limit) for p in pieces] == [(["b"], 7, None, 7), (["a", "c"], 6, None, 5)]


def test_a_job_with_no_documents_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="no documents"):
        plan_pieces({"a": 0}, 4)


def _running(pieces: int = 3) -> JobInfo:
    request = EvaluateRequest(model="dummy", tasks=["t"], shards=pieces)
    info = lifecycle.enqueue("00000000-0000-4000-8000-000000000000", request, created_at="t0", stream_seq=1)
    started = lifecycle.start(info, attempt=1, worker="w", at="t1")
    assert started is not None
    planned = sharding.plan(started, plan_pieces({"t": 30}, pieces))
    assert planned is not None
    return planned


def test_a_plan_is_written_once_and_only_on_a_running_job() -> None:
    info = _running()
    assert (info.shards, info.shards_done, info.progress and info.progress.total) == (3, 0, 30)
    assert sharding.plan(info, info.pieces) is None, "planned twice"
    queued = lifecycle.enqueue(info.job_id, EvaluateRequest(model="d", tasks=["t"]), created_at="t", stream_seq=1)
    assert sharding.plan(queued, info.pieces) is None


def test_pieces_complete_once_and_the_job_counts_them() -> None:
    info = _running()
    for index in range(3):
        started = sharding.piece_start(info, index, worker="w", at="t")
        assert started is not None
        info = sharding.piece_finish(started, index, at="t", seconds=1.0) or info
        assert sharding.piece_start(info, index, worker="w2", at="t") is None, "a completed piece ran again"
        assert sharding.piece_finish(info, index, at="t", seconds=1.0) is None
    assert info.shards_done == 3 and sharding.all_pieces_done(info)
    assert info.progress is not None and info.progress.done == info.progress.total == 30


def test_a_failed_attempt_queues_the_piece_again_until_the_last() -> None:
    info = _running()
    started = sharding.piece_start(info, 1, worker="w", at="t")
    assert started is not None
    again = sharding.piece_fail(started, 1, error="boom", final=False, at="t")
    assert again is not None and again.pieces[1].status == "queued" and again.pieces[1].attempts == 1
    restarted = sharding.piece_start(again, 1, worker="w2", at="t")
    assert restarted is not None and restarted.pieces[1].attempts == 2
    failed = sharding.piece_fail(restarted, 1, error="boom", final=True, at="t")
    assert failed is not None and failed.pieces[1].status == "failed"
    assert sharding.piece_start(failed, 1, worker="w3", at="t") is None


def test_a_redelivered_piece_starts_again_with_the_next_attempt() -> None:
    started = sharding.piece_start(_running(), 0, worker="dead", at="t")
    assert started is not None
    again = sharding.piece_start(started, 0, worker="alive", at="t")
    assert again is not None and (again.pieces[0].attempts, again.pieces[0].worker) == (2, "alive")


def test_cancelling_a_sharded_job_cancels_its_waiting_pieces_and_nothing_starts() -> None:
    info = _running()
    running = sharding.piece_start(info, 0, worker="w", at="t")
    assert running is not None
    cancelling = lifecycle.request_cancel(running, at="t")
    assert cancelling is not None and cancelling.status == "cancelling"
    assert [p.status for p in cancelling.pieces] == ["running", "cancelled", "cancelled"]
    assert sharding.pieces_running(cancelling) == [0]
    assert sharding.piece_start(cancelling, 1, worker="w", at="t") is None
    stopped = sharding.piece_cancel(cancelling, 0, at="t")
    assert stopped is not None and sharding.pieces_running(stopped) == []
    # A piece that finished as the cancel came keeps its result; the job still ends cancelled.
    finished = sharding.piece_finish(cancelling, 0, at="t", seconds=1.0)
    assert finished is not None and finished.pieces[0].status == "completed"


def _held(pieces: int = 4) -> JobInfo:
    started = _running(pieces)
    fresh = msgspec.structs.replace(started, pieces=[], shards=pieces)
    held = sharding.plan(fresh, plan_pieces({"t": 40}, pieces), hold=True)
    assert held is not None and [p.status for p in held.pieces] == ["held"] * pieces
    return held


def test_held_pieces_are_released_up_to_a_target_that_a_second_release_keeps() -> None:
    info = _held()
    assert sharding.piece_start(info, 0, worker="w", at="t") is None, "a held piece started"
    two = sharding.release(info, 2, at="t2")
    assert two is not None and [p.status for p in two.pieces] == ["queued", "queued", "held", "held"]
    assert [p.released_at for p in two.pieces] == ["t2", "t2", None, None]
    # The same target again (from a summary that does not show the release yet): nothing more.
    assert sharding.release(two, 2, at="t") is None
    running = sharding.piece_start(two, 0, worker="w", at="t")
    assert running is not None
    three = sharding.release(running, 3, at="t")
    assert three is not None and [p.status for p in three.pieces] == ["running", "queued", "queued", "held"]
    rest = sharding.release(three, 99, at="t")
    assert rest is not None and rest.pieces[3].status == "queued"


def test_held_pieces_are_cancelled_with_their_job_and_never_released_after() -> None:
    cancelling = lifecycle.request_cancel(sharding.release(_held(), 1, at="t") or _held(), at="t")
    assert cancelling is not None
    assert [p.status for p in cancelling.pieces] == ["cancelled"] * 4
    assert sharding.release(cancelling, 4, at="t") is None


def test_progress_of_a_piece_never_goes_back() -> None:
    info = sharding.piece_start(_running(), 0, worker="w", at="t")
    assert info is not None
    ahead = sharding.piece_progress(info, 0, 8)
    assert ahead is not None
    behind = sharding.piece_progress(ahead, 0, 2)
    assert behind is not None and behind.pieces[0].done == 8
    assert sharding.piece_progress(ahead, 1, 3) is None, "a piece that is not running reports nothing"
