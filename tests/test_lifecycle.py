"""The job lifecycle as pure logic: the table, each change, and racing writers (no NATS)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evalq import lifecycle
from evalq.lifecycle import Cancellation, Failure, Outcome, Success
from evalq.schemas import TERMINAL, EvaluateRequest, JobInfo, JobResult, Progress, Verdict

REQUEST = EvaluateRequest(model="dummy", tasks=["evalq_demo"], labels={"step": "1"})
AT = "2026-01-01T00:00:00.000Z"
PROGRESS = Progress(phase="eval", done=1, total=2, percent=50.0)

# The contract, written out independently of the module: (state, transition) -> next states.
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("queued", "admit"): {"queued"},
    ("queued", "start"): {"running"},
    ("running", "start"): {"running"},
    ("running", "progress"): {"running"},
    ("running", "stall"): {"running"},
    ("queued", "request_cancel"): {"cancelled"},
    ("running", "request_cancel"): {"cancelling"},
    ("queued", "finish"): {"completed", "failed", "cancelled"},
    ("running", "finish"): {"completed", "failed", "cancelled"},
    ("cancelling", "finish"): {"completed", "failed", "cancelled"},
    ("running", "requeue"): {"queued"},
    ("running", "request_preempt"): {"running"},
    ("running", "preempt"): {"queued"},
    ("completed", "judge"): {"completed"},
}
VERDICT = Verdict(verdict="GO", policy="p", at="2026-01-01T00:00:00.000Z")
OUTCOMES: list[Outcome] = [
    Success(result=JobResult(metrics={"t": {"acc": 1.0}})),
    Failure(error="boom", exit_code=1, log_tail="last line"),
    Cancellation(reason="cancelled while running", latency_s=0.5),
]


def record(status: str) -> JobInfo:
    info = lifecycle.enqueue("j1", REQUEST, created_at=AT, stream_seq=7)
    return JobInfo(**{**{f: getattr(info, f) for f in info.__struct_fields__}, "status": status})


def apply(info: JobInfo, transition: str, outcome: Outcome = OUTCOMES[0]) -> JobInfo | None:
    match transition:
        case "admit":
            return lifecycle.admit(info, at=AT)
        case "request_preempt":
            return lifecycle.request_preempt(info, at=AT)
        case "preempt":
            return lifecycle.preempt(info)
        case "start":
            return lifecycle.start(info, attempt=2, worker="w1", at=AT)
        case "progress":
            return lifecycle.progress(info, PROGRESS)
        case "stall":
            return lifecycle.stall(info, since=AT)
        case "request_cancel":
            return lifecycle.request_cancel(info, at=AT)
        case "finish":
            return lifecycle.finish(info, outcome, at=AT)
        case "requeue":
            return lifecycle.requeue(info)
        case "judge":
            return lifecycle.judge(info, VERDICT)
    raise AssertionError(transition)


@pytest.mark.parametrize(("state", "transition"), list(itertools.product(lifecycle.STATES, lifecycle.TRANSITIONS)))
def test_every_pair_is_allowed_or_refused_as_the_table_says(state: str, transition: str) -> None:
    expected = EXPECTED.get((state, transition), set())
    assert set(lifecycle.allowed(state, transition)) == expected
    results = [apply(record(state), transition, outcome) for outcome in OUTCOMES]
    if not expected:
        assert results == [None] * len(results), "a refused change must not produce a record"
        return
    for after in results:
        assert after is not None
        assert after.status in expected


def test_a_job_is_admitted_once() -> None:
    admitted = lifecycle.admit(record("queued"), at=AT)
    assert admitted is not None and admitted.admitted_at == AT and admitted.status == "queued"
    assert lifecycle.admit(admitted, at=AT) is None, "a second dispatcher must lose"


def test_a_preempted_job_waits_again_for_its_turn() -> None:
    running = lifecycle.admit(record("queued"), at=AT)
    assert running is not None
    running = lifecycle.start(running, attempt=1, worker="w1", at=AT)
    assert running is not None
    asked = lifecycle.request_preempt(running, at=AT)
    assert asked is not None and asked.status == "running" and asked.preempt_requested_at == AT
    assert lifecycle.request_preempt(asked, at=AT) is None, "asked once"
    back = lifecycle.preempt(asked)
    assert back is not None and back.status == "queued" and back.preemptions == 1
    assert back.admitted_at is None and back.preempt_requested_at is None and back.worker is None
    sharded = msgspec.structs.replace(running, shards=4)
    assert lifecycle.request_preempt(sharded, at=AT) is None, "a sharded job yields between pieces"


def test_the_table_names_only_known_states_and_transitions() -> None:
    for (state, transition), targets in lifecycle.ALLOWED.items():
        assert state in lifecycle.STATES and transition in lifecycle.TRANSITIONS
        assert set(targets) <= set(lifecycle.STATES)
    # Terminal states are final: only a completed job's verdict is written after, in its state.
    after_end = {(state, t): targets for (state, t), targets in lifecycle.ALLOWED.items() if state in TERMINAL}
    assert after_end == {("completed", "judge"): frozenset({"completed"})}


def test_a_verdict_is_written_once() -> None:
    judged = lifecycle.judge(record("completed"), VERDICT)
    assert judged is not None and judged.verdict == VERDICT and judged.status == "completed"
    assert lifecycle.judge(judged, VERDICT) is None
    event = lifecycle.gated_event(judged)
    assert (event.job_id, event.verdict, event.time) == ("j1", VERDICT, VERDICT.at)


def test_every_event_carries_the_jobs_team_into_its_subject() -> None:
    from evalq.events import EventPublisher
    from evalq.topology import Topology

    info = lifecycle.enqueue("j1", REQUEST, created_at=AT, stream_seq=7, team="ml")
    events = [
        lifecycle.queued_event(info),
        lifecycle.started_event(info, worker="w1", at=AT),
        lifecycle.progress_event(info, PROGRESS, worker="w1", at=AT),
        lifecycle.requeued_event(info, attempt=1, worker="w1", reason="r", at=AT),
        lifecycle.terminal_event(info, OUTCOMES[0]),
    ]
    assert {event.team for event in events} == {"ml"}
    # A publisher without a connection: only the subject it would write to is read.
    unconnected = SimpleNamespace(jetstream=lambda **_: None)
    publisher = EventPublisher(unconnected, Topology(), timeout=1.0)  # type: ignore[arg-type]
    assert publisher.write(events[0]).subject == "evalq.events.ml.j1.queued"
    assert lifecycle.queued_event(record("queued")).team == "default"


def test_finish_keeps_what_the_outcome_says() -> None:
    running = apply(record("queued"), "start")
    assert running is not None and (running.worker, running.attempts) == ("w1", 2)
    done = lifecycle.finish(running, OUTCOMES[0], at=AT)
    assert done is not None and done.status == "completed" and done.result == OUTCOMES[0].result  # type: ignore[union-attr]
    failed = lifecycle.finish(running, OUTCOMES[1], at=AT)
    assert failed is not None and (failed.status, failed.error, failed.completed_at) == ("failed", "boom", AT)
    event = lifecycle.terminal_event(failed, OUTCOMES[1], worker="w1")
    assert (event.exit_code, event.log_tail, event.worker, event.attempt) == (1, "last line", "w1", 2)  # type: ignore[union-attr]
    cancelled = lifecycle.finish(running, OUTCOMES[2], at=AT)
    assert cancelled is not None
    assert lifecycle.terminal_event(cancelled, OUTCOMES[2]).cancel_latency_s == 0.5  # type: ignore[union-attr]
    # Without the outcome (a repair), the event still says what the record knows.
    repaired = lifecycle.terminal_event(failed)
    assert (repaired.error, repaired.exit_code) == ("boom", None)  # type: ignore[union-attr]


def test_a_stall_is_marked_once_and_moving_progress_takes_the_mark_off() -> None:
    running = record("running")
    stalled = lifecycle.stall(running, since=AT)
    assert stalled is not None and stalled.stalled_since == AT and stalled.status == "running"
    assert lifecycle.stall(stalled, since="later") is None, "a job marked stalled is marked once"
    event = lifecycle.stalled_event(stalled, worker="w1", at=AT, seconds=30.04, action="fail")
    assert (event.since, event.seconds, event.action, event.worker) == (AT, 30.04, "fail", "w1")
    moved = lifecycle.progress(stalled, PROGRESS)
    assert moved is not None and moved.stalled_since is None
    restarted = lifecycle.start(stalled, attempt=2, worker="w2", at=AT)
    assert restarted is not None and restarted.stalled_since is None


def test_a_queued_cancel_is_terminal_and_a_running_one_waits_for_the_worker() -> None:
    queued = lifecycle.request_cancel(record("queued"), at=AT)
    assert queued is not None and queued.status == "cancelled" and queued.completed_at == AT
    assert lifecycle.terminal_event(queued).reason == "cancelled while queued"  # type: ignore[union-attr]
    running = lifecycle.request_cancel(record("running"), at=AT)
    assert running is not None and (running.status, running.completed_at) == ("cancelling", None)
    assert running.cancel_requested_at == AT


# --- two writers racing, as a compare-and-set store sees them ------------------------------


@dataclass
class Store:
    """A record with a revision: the compare-and-set semantics of the jobs bucket."""

    info: JobInfo
    revision: int = 1
    events: list[str] = field(default_factory=lambda: ["queued"])
    terminal_writes: int = 0


def implied_events(before: JobInfo, after: JobInfo, transition: str) -> list[str]:
    if transition == "start":
        return ["requeued", "started"] if before.status == "running" else ["started"]
    if transition == "progress":
        return ["progress"]
    if transition == "stall":
        return ["stalled"]
    if transition == "requeue":
        return ["requeued"]
    if transition == "judge":
        return []  # `gated` comes after the terminal event and is not part of the run's
    if after.status in TERMINAL:
        return [after.status]
    return []  # a running job's cancel request: the worker's `cancelled` follows


def valid_sequence(events: list[str]) -> bool:
    if not events or events[0] != "queued":
        return False
    phase = "queued"
    for event in events[1:]:
        if phase == "done":
            return False
        if event == "started":
            phase = "running"
        elif event in ("progress", "stalled") and phase != "running":
            return False
        elif event == "requeued":
            if phase != "running":
                return False
            phase = "queued"
        elif event in TERMINAL:
            phase = "done"
    return True


Step = tuple[str, int]  # (transition, outcome index)
steps = st.tuples(st.sampled_from(lifecycle.TRANSITIONS), st.integers(0, len(OUTCOMES) - 1))


@settings(max_examples=400, deadline=None)
@given(
    first=st.lists(steps, min_size=1, max_size=6),
    second=st.lists(steps, min_size=1, max_size=6),
    schedule=st.lists(st.booleans(), min_size=0, max_size=48),
)
def test_any_interleaving_of_two_writers_ends_in_at_most_one_terminal_state(
    first: list[Step], second: list[Step], schedule: list[bool]
) -> None:
    """Each write reads the record, computes the change, and writes it if the revision is
    unchanged (else reads again); the schedule decides whose read or write happens next."""
    store = Store(record("queued"))
    terminal_seen: list[str] = []

    def writer(program: list[Step]) -> Callable[[], bool]:
        queue = list(program)
        pending: tuple[int, JobInfo, Step] | None = None  # revision read, next record, the step

        def step() -> bool:
            nonlocal pending
            if pending is None:
                if not queue:
                    return False
                taken = queue.pop(0)
                after = apply(store.info, taken[0], OUTCOMES[taken[1]])
                if after is not None:
                    pending = (store.revision, after, taken)
                return True
            revision, after, taken = pending
            transition = taken[0]
            pending = None
            if revision != store.revision:
                queue.insert(0, taken)
                return True  # lost the race: read again
            before, store.info = store.info, after
            store.revision += 1
            store.events += implied_events(before, after, transition)
            if after.status in TERMINAL and before.status not in TERMINAL:
                terminal_seen.append(after.status)
            return True

        return step

    writers = [writer(first), writer(second)]
    turns = iter(schedule)
    for _ in range(200):  # bounded: each program is finite, and a lost race retries once per loss
        chosen = int(next(turns, False))
        if not writers[chosen]() and not writers[1 - chosen]():
            break
    assert len(terminal_seen) <= 1
    if terminal_seen:
        assert store.info.status == terminal_seen[0], "a terminal record never changes again"
    assert valid_sequence(store.events), store.events


def test_the_sequence_checker_refuses_what_it_should() -> None:
    assert valid_sequence(["queued", "started", "progress", "completed"])
    assert valid_sequence(["queued", "started", "requeued", "started", "failed"])
    assert valid_sequence(["queued", "cancelled"])
    assert not valid_sequence(["queued", "completed", "failed"])
    assert not valid_sequence(["queued", "progress"])
    assert not valid_sequence(["started", "completed"])
