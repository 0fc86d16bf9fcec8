"""A checkpoint's turnaround, from a job's record and events alone: its parts add up to the
total, each ends where the design says, and what is not known yet is null."""

from __future__ import annotations

import msgspec
import pytest

from evalq.schemas import Completed, Event, JobInfo, Queued, Started, Tracked
from evalq.turnaround import Turnaround, turnaround, turnaround_line

JOB = "3f7bc3b2-786a-46c5-9a50-2574cb77978d"
SAVED = "2026-11-27T11:50:00.000Z"


def record(**fields: object) -> JobInfo:
    base: dict[str, object] = {
        "job_id": JOB,
        "status": "completed",
        "labels": {"step": "300", "saved_at": SAVED},
        "created_at": "2026-11-27T11:50:42.300Z",
        "started_at": "2026-11-27T11:50:42.400Z",
        "completed_at": "2026-11-27T11:50:50.300Z",
        "attempts": 1,
    }
    return JobInfo(**{**base, **fields})  # type: ignore[arg-type]


def started(attempt: int = 1, load: float | None = 5.2, **fields: object) -> Started:
    return Started(job_id=JOB, time="2026-11-27T11:50:47.600Z", attempt=attempt, model_load_seconds=load, **fields)  # type: ignore[arg-type]


def tracked(time: str = "2026-11-27T11:50:50.500Z") -> Tracked:
    return Tracked(job_id=JOB, time=time, attempt=1, trackers=["tensorboard"])


def parts(value: Turnaround) -> float:
    return sum(p or 0.0 for p in (value.detection, value.queue, value.load, value.evaluation, value.logging))


def test_a_logged_checkpoint_is_split_from_its_save_to_the_tracked_event() -> None:
    events: list[Event] = [
        Queued(job_id=JOB, time="2026-11-27T11:50:42.300Z"),
        started(),
        Completed(job_id=JOB, time="2026-11-27T11:50:50.300Z", attempt=1),
        tracked(),
    ]
    value = turnaround(record(), events)
    assert value == Turnaround(
        saved_at=SAVED,
        logged_at="2026-11-27T11:50:50.500Z",
        total=50.5,
        detection=42.3,
        queue=0.1,
        load=5.2,
        evaluation=2.7,
        logging=0.2,
    )
    assert parts(value) == pytest.approx(value.total)
    assert turnaround_line(value) == "50.5 s: detection 42.3, queue 0.1, load 5.2, evaluation 2.7, logging 0.2"
    # Its JSON, as `evalq status --json` and the dashboard give it.
    assert msgspec.json.decode(msgspec.json.encode(value))["logging"] == 0.2


def test_before_it_is_logged_the_total_ends_at_the_completion() -> None:
    value = turnaround(record(), [started()])
    assert value is not None
    assert (value.total, value.logging, value.logged_at) == (50.3, None, None)
    assert parts(value) == pytest.approx(value.total)
    line = "50.3 s to completion, not logged yet: detection 42.3, queue 0.1, load 5.2, evaluation 2.7"
    assert turnaround_line(value) == line


def test_a_job_still_running_has_no_total_and_no_evaluation() -> None:
    value = turnaround(record(status="running", completed_at=None), [started(), tracked()])
    assert value is not None
    assert (value.total, value.evaluation, value.logging) == (None, None, None)
    assert (value.detection, value.queue, value.load) == (42.3, 0.1, 5.2)
    assert turnaround_line(value) == "not completed yet: detection 42.3, queue 0.1, load 5.2"
    queued = turnaround(record(status="queued", started_at=None, completed_at=None, attempts=0), [])
    assert queued is not None and queued.queue is None
    assert turnaround_line(queued) == "not completed yet: detection 42.3"


def test_a_failed_job_has_no_total() -> None:
    value = turnaround(record(status="failed"), [started()])
    assert value is not None and value.total is None and value.evaluation is None


def test_the_last_attempts_load_counts_and_the_first_tracked_event() -> None:
    # Attempt 1 loaded for 9 s and its worker died; attempt 2 swapped weights in 1 s. A second
    # tracker (or a redelivery past the duplicate window) recorded the job later.
    events: list[Event] = [
        started(attempt=1, load=9.0),
        started(attempt=2, load=1.0, weights_swapped=True),
        tracked("2026-11-27T11:50:50.500Z"),
        tracked("2026-11-27T11:51:30.000Z"),
    ]
    value = turnaround(record(attempts=2), events)
    assert value is not None
    assert (value.load, value.evaluation, value.logging, value.total) == (1.0, 6.9, 0.2, 50.5)


def test_where_the_load_is_unknown_the_evaluation_holds_it() -> None:
    # A fresh evaluation process loads its own model: the worker measures nothing.
    value = turnaround(record(), [started(load=None), tracked()])
    assert value is not None and value.load is None and value.evaluation == 7.9
    assert parts(value) == pytest.approx(value.total)
    assert "load" not in turnaround_line(value)
    # A re-score loads no model at all.
    rescore = turnaround(record(), [started(load=None, loads_model=False), tracked()])
    assert rescore is not None and rescore.load == 0.0 and rescore.evaluation == 7.9


@pytest.mark.parametrize(
    "labels",
    [{"step": "300"}, {"saved_at": "yesterday"}, {"saved_at": "2026-11-27T11:50:00"}, {"saved_at": ""}],
)
def test_without_a_save_time_with_a_zone_there_is_no_turnaround(labels: dict[str, str]) -> None:
    assert turnaround(record(labels=labels), [started(), tracked()]) is None


def test_a_save_time_in_another_zone_is_the_same_instant() -> None:
    value = turnaround(record(labels={"saved_at": "2026-11-27T12:50:00+01:00"}), [started(), tracked()])
    assert value is not None and value.detection == 42.3 and value.saved_at == "2026-11-27T12:50:00+01:00"
