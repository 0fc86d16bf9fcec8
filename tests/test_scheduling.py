"""The scheduler's order, pure: priority with aging, fair share, quotas, yielding pieces."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from evalq.scheduling import (
    PoolView,
    Scheduling,
    TeamPolicy,
    admissions,
    level,
    order,
    releases,
    team_uses,
    victims,
)
from evalq.schemas import JobSummary

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
NOW_US = int(NOW.timestamp() * 1_000_000)
_seq = iter(range(1, 10**6))


def at(seconds_ago: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds_ago)).isoformat().replace("+00:00", "Z")


def job(team: str = "a", priority: str = "normal", *, waited: float = 0.0, **fields: Any) -> JobSummary:
    seq = next(_seq)
    status = fields.pop("status", "queued")
    return JobSummary(
        job_id=f"{team}-{seq}",
        status=status,
        created_at=at(waited),
        team=team,
        priority=priority,
        stream_seq=seq if status == "queued" else None,
        **fields,
    )


def view(jobs: list[JobSummary], half_life: float = 3600.0) -> PoolView:
    return PoolView.of(jobs, now_us=NOW_US, half_life_s=half_life)


def ids(placed: list[tuple[JobSummary, str | None]]) -> list[str]:
    return [j.job_id for j, _ in placed]


def test_urgent_goes_before_every_normal_job_and_fifo_holds_within_a_level() -> None:
    normals = [job() for _ in range(20)]
    urgent = job(priority="urgent")
    placed = order(view([*normals, urgent]), Scheduling(), NOW_US)
    assert ids(placed) == [urgent.job_id] + [j.job_id for j in normals]
    assert placed[1][1] == "behind higher priority"


def test_a_low_job_rises_one_level_per_aging_period_and_never_to_urgent() -> None:
    assert level(job(priority="low", waited=5), NOW_US, aging_s=10) == 0
    assert level(job(priority="low", waited=10), NOW_US, aging_s=10) == 1
    assert level(job(priority="low", waited=10_000), NOW_US, aging_s=10) == 2, "aging stops at high"
    assert level(job(priority="urgent", waited=10_000), NOW_US, aging_s=10) == 3
    # Two periods raise a low job to high; every job submitted after it reaches high later,
    # and within a level the first submitted goes first: the low job is next.
    low = job(priority="low", waited=21)  # submitted first: its sequence is the lowest
    stream = [job(waited=w) for w in (15, 5, 1)]
    placed = order(view([*stream, low]), Scheduling(aging_s=10), NOW_US)
    assert ids(placed) == [low.job_id] + [j.job_id for j in stream]
    # One period in, the normal job submitted a second after it has aged to high first.
    young = job(priority="low", waited=12)
    later = job(waited=11)
    assert ids(order(view([young, later]), Scheduling(aging_s=10), NOW_US)) == [later.job_id, young.job_id]


def test_fair_share_interleaves_teams_by_weighted_use() -> None:
    a = [job("a") for _ in range(6)]
    b = [job("b") for _ in range(3)]
    placed = order(view([*a, *b]), Scheduling(), NOW_US)
    teams = [j.team for j, _ in placed]
    assert teams[:6] == ["a", "b", "a", "b", "a", "b"], "equal shares and no use: alternate"
    # Team a has used the pool (decayed GPU-seconds): b's jobs come first until b catches up.
    spent = [job("a", status="completed", started_at=at(200), completed_at=at(100), gpu_s=60.0) for _ in range(2)]
    placed = order(view([*a, *b, *spent]), Scheduling(), NOW_US)
    assert [j.team for j, _ in placed][:2] == ["b", "b"], "a used two mean jobs' worth more"
    assert placed[0][1] is None and placed[1][1] is not None
    # A share of 3 against 1: three of a's for one of b's.
    weighted = Scheduling(teams={"a": TeamPolicy(share=3.0)})
    teams = [j.team for j, _ in order(view([*a, *b]), weighted, NOW_US)]
    assert teams[:8].count("a") == 6 and teams[:8].count("b") == 2


def test_use_decays_with_the_half_life() -> None:
    old = job("a", status="completed", started_at=at(7300), completed_at=at(7200), gpu_s=100.0)
    assert view([old], half_life=3600).use["a"] == 25.0
    running = job("b", status="running", started_at=at(30), num_gpus=2)
    assert view([running]).use["b"] == 60.0
    assert view([running]).running_gpus["b"] == 2


def test_admissions_fill_only_free_workers_and_hold_a_team_at_its_quota() -> None:
    a = [job("a") for _ in range(4)]
    b = [job("b") for _ in range(2)]
    running = job("a", status="running", started_at=at(10), num_gpus=1)
    pool = view([*a, *b, running])
    scheduling = Scheduling(teams={"a": TeamPolicy(max_running_gpus=2)})
    placed = order(pool, scheduling, NOW_US)
    taken, held = admissions(pool, placed, scheduling, idle_workers=5, busy_with={running.job_id: 1})
    assert [j.team for j in taken].count("a") == 1, "a runs 1 GPU; its quota of 2 admits one more"
    assert len(taken) == 3 and [j.team for j in taken].count("b") == 2
    assert any(why.startswith("team quota: a runs 2 of 2 GPUs") for why in held.values())
    # Nothing is admitted beyond the workers that are free.
    taken, _ = admissions(pool, placed, Scheduling(), idle_workers=0, busy_with={running.job_id: 1})
    assert taken == []


def test_held_pieces_are_released_within_the_quota_before_the_teams_waiting_jobs() -> None:
    quota = Scheduling(teams={"a": TeamPolicy(max_running_gpus=3)})
    other = job("a", status="running", started_at=at(20))
    planned = job("a", status="running", started_at=at(10), shards=6, pieces_held=6)
    waiting = job("a")
    pool = view([other, planned, waiting])
    assert pool.running_gpus["a"] == 2, "a planned job holds the GPU its plan ran on"
    (released,) = releases(pool, quota)
    assert released == (planned, 2), "3 GPUs less the other job's: two of its pieces"
    assert pool.running_gpus["a"] == 3
    taken, held = admissions(pool, order(pool, quota, NOW_US), quota, idle_workers=4, busy_with={})
    assert taken == [] and held[waiting.job_id] == "team quota: a runs 3 of 3 GPUs"
    # Its released pieces count as they wait and as they run; a piece that ends makes room.
    going = job("a", status="running", started_at=at(10), shards=6, pieces_running=1, pieces_waiting=1, pieces_held=4)
    assert releases(view([other, going]), quota) == []
    one_done = job("a", status="running", started_at=at(10), shards=6, pieces_running=1, pieces_held=3)
    assert releases(view([other, one_done]), quota) == [(one_done, 2)]
    # Without a quota (lifted after the plan), every held piece goes.
    assert releases(view([planned]), Scheduling()) == [(planned, 6)]
    # A team over its quota still runs one piece on the GPU its plan took.
    crowded = view([job("a", status="running", started_at=at(20), num_gpus=3), planned])
    assert releases(crowded, quota) == [(planned, 1)]
    # A job of the team waiting at a higher priority gets the quota first.
    urgent = job("a", "urgent")
    going_on = view([other, one_done, urgent])
    assert releases(going_on, quota) == []
    taken, _ = admissions(going_on, order(going_on, quota, NOW_US), quota, idle_workers=1, busy_with={})
    assert taken == [urgent]
    # Pieces of two GPUs each: a quota of 4 runs two of them.
    wide = job("a", status="running", started_at=at(10), shards=6, pieces_held=6, num_gpus=2)
    pool = view([wide])
    assert pool.running_gpus["a"] == 2 and releases(pool, Scheduling(teams={"a": TeamPolicy(max_running_gpus=4)})) == [
        (wide, 2)
    ]
    assert pool.running_gpus["a"] == 4


def test_an_admitted_job_waiting_for_a_worker_takes_that_worker() -> None:
    waiting = job("a")
    admitted = job("a", admitted_at=at(1))
    pool = view([waiting, admitted])
    taken, _ = admissions(pool, order(pool, Scheduling(), NOW_US), Scheduling(), idle_workers=1, busy_with={})
    assert taken == []


def test_pieces_of_a_lower_priority_job_yield_to_a_higher_one() -> None:
    sharded = job("a", "low", status="running", started_at=at(10), shards=8, pieces_running=2, pieces_waiting=6)
    high = job("b", "high")
    normal = job("b", "normal")
    pool = view([sharded, high, normal])
    placed = order(pool, Scheduling(), NOW_US)
    busy = {sharded.job_id: 2}
    taken, _ = admissions(pool, placed, Scheduling(), idle_workers=0, busy_with=busy)
    assert [j.job_id for j in taken] == [high.job_id, normal.job_id], "both outrank the low pieces"
    same = job("a", "low", status="running", started_at=at(10), shards=8, pieces_running=2, pieces_waiting=6)
    peer = job("b", "low")
    pool = view([same, peer])
    taken, _ = admissions(pool, order(pool, Scheduling(), NOW_US), Scheduling(), idle_workers=1, busy_with={})
    assert taken == [], "an equal job waits for the pieces queued before it"


def test_team_uses_list_each_team_with_its_limits() -> None:
    pool = view([job("a"), job("b", status="running", started_at=at(5))])
    rows = team_uses({"default": pool}, {"default": Scheduling(teams={"c": TeamPolicy(max_queued=3)})})
    by_team = {r.team: r for r in rows}
    assert set(by_team) == {"a", "b", "c"}
    assert by_team["a"].queued == 1 and by_team["b"].running_gpus == 1 and by_team["c"].max_queued == 3


def test_a_waiting_high_job_picks_the_latest_started_low_job_to_preempt() -> None:
    old_low = job("a", "low", status="running", started_at=at(60))
    new_low = job("a", "low", status="running", started_at=at(5))
    normal = job("a", "normal", status="running", started_at=at(1))
    sharded = job("a", "low", status="running", started_at=at(2), shards=4, pieces_running=1)
    pool = view([old_low, new_low, normal, sharded])
    assert victims(pool, [job("b", "high")], asked=0) == [new_low]
    assert victims(pool, [job("b", "urgent"), job("b", "high")], asked=0) == [new_low, old_low]
    assert victims(pool, [job("b", "high")], asked=1) == [], "one preemption under way already serves it"
    assert victims(pool, [job("b", "normal")], asked=0) == [], "only high and urgent jobs preempt"
    # A whole low job's worker does not count as free: it is preempted, not yielded.
    taken, _ = admissions(
        pool,
        order(view([job("b", "high")]), Scheduling(), NOW_US),
        Scheduling(),
        idle_workers=0,
        busy_with={new_low.job_id: 1},
    )
    assert taken == []


def test_the_reasons_equal_a_look_at_every_job_ahead() -> None:
    """The running summary `order` keeps gives the reason a full look at every job ahead gives."""
    rng = random.Random(5)
    for _ in range(40):
        jobs = [
            job(rng.choice("abc"), rng.choice(["low", "normal", "high", "urgent"]), waited=rng.uniform(0, 50))
            for _ in range(rng.randint(1, 30))
        ]
        admitted = [job(rng.choice("abc"), admitted_at=at(1)) for _ in range(rng.randint(0, 2))]
        pool = view(jobs + admitted)
        scheduling = Scheduling(aging_s=20)
        placed = order(pool, scheduling, NOW_US)
        for index, (current, why) in enumerate(placed):
            ahead = pool.admitted + [j for j, _ in placed[:index]]
            mine = level(current, NOW_US, 20)
            if not ahead:
                expected = None
            elif any(level(other, NOW_US, 20) > mine for other in ahead):
                expected = "behind higher priority"
            elif any(other.team != current.team and other.stream_seq > current.stream_seq for other in ahead):
                expected = "fair share: other teams have used less of the pool"
            else:
                expected = "behind earlier jobs"
            assert why == expected, (index, current, why, expected)
