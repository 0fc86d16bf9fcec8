"""Many teams on one pool, end to end: fair share, priority with aging, quotas, pieces that
yield. Two teams are two NATS accounts (the shipped accounts file plus TEAM_A and TEAM_B), so
each job's team comes from nats-server; workers run a stand-in evaluator of a fixed length."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.errors import InvalidField, QuotaExceeded
from evalq.gateway import Gateway
from evalq.policy import PoolPolicy, store_policy
from evalq.scheduling import Scheduling, TeamPolicy
from evalq.schemas import JobInfo
from evalq.topology import Topology

from .conftest import Workers
from .jobs import FAKE
from .test_auth import accounts_server, as_user
from .test_teams import member, two_teams
from .waiting import eventually

pytestmark = pytest.mark.slow

TIMED = [str(Path(__file__).parent / "timed_evaluator.sh")]


def job(seconds: float, **fields: Any) -> dict[str, Any]:
    return {"model": "dummy", "tasks": ["fake"], "model_args": {"seconds": seconds}, **fields}


def t(when: str | None) -> float:
    assert when is not None
    return dt.datetime.fromisoformat(when).timestamp()


@dataclass
class Pool:
    gateway: Gateway
    workers: Workers
    worker_settings: Settings
    a: AsyncClient
    b: AsyncClient

    async def records(self, ids: list[str]) -> list[JobInfo]:
        return list(await asyncio.gather(*(self.a.get_job(i) if i in self.mine_a else self.b.get_job(i) for i in ids)))

    mine_a: set[str]


@contextlib.asynccontextmanager
async def pool(
    tmp_path: Path, settings: Settings, scheduling: Scheduling, workers: int, evaluator: list[str] = TIMED
) -> AsyncIterator[Pool]:
    # The operator's right to write the pool's policy, given here to the gateway's user.
    text = two_teams().replace('"$KV.evalq-idempotency.>",', '"$KV.evalq-idempotency.>", "$KV.evalq-pools.>",', 1)
    with accounts_server(tmp_path, text) as server:
        gateway_settings = as_user(settings, server, "gateway")
        gateway_nc = await connect(gateway_settings)
        topology = Topology.from_settings(gateway_settings)
        await topology.ensure(gateway_nc.jetstream(timeout=5.0))
        await store_policy(gateway_nc, topology, "default", PoolPolicy(scheduling=scheduling), timeout=5.0)
        worker_settings = as_user(settings, server, "worker").with_(heartbeat=1.0)
        try:
            async with (
                Gateway(gateway_nc, gateway_settings, topology) as gateway,
                Workers(worker_settings) as running,
                AsyncClient(member(settings, server.url, "alice", "pw-a")) as a,
                AsyncClient(member(settings, server.url, "team_b", "pw-b")) as b,
            ):
                for _ in range(workers):
                    await running.start(evaluator=evaluator)
                await eventually(
                    gateway.registry.workers, until=lambda ws: len(ws) == workers, what="workers listed", timeout=30
                )
                yield Pool(gateway, running, worker_settings, a, b, set())
        finally:
            await gateway_nc.close()


async def all_done(p: Pool, ids: list[str], timeout: float) -> list[JobInfo]:
    async def done() -> list[JobInfo]:
        return await p.records(ids)

    return await eventually(
        done, until=lambda rs: all(r.status == "completed" for r in rs), what="every job completed", timeout=timeout
    )


async def test_fair_share_gives_a_late_team_its_share_at_once(tmp_path: Path, settings: Settings) -> None:
    length = 1.0
    async with pool(tmp_path, settings, Scheduling(), workers=2) as p:
        a_ids = [(await p.a.submit(**job(length))).job_id for _ in range(30)]
        p.mine_a.update(a_ids)

        def partway(rs: list[JobInfo]) -> bool:
            started = [t(r.started_at) for r in rs if r.started_at]
            return len(started) == 2 and time.time() - max(started) >= 0.4 * length

        # Team B comes late: while team A's first jobs are partway through.
        await eventually(lambda: p.records(a_ids[:2]), until=partway, what="team A's first jobs partway", timeout=30)
        b_ids = [(await p.b.submit(**job(length))).job_id for _ in range(3)]
        records = await all_done(p, a_ids + b_ids, timeout=120)
    by_id = {r.job_id: r for r in records}
    assert {by_id[i].team for i in a_ids} == {"TEAM_A"} and {by_id[i].team for i in b_ids} == {"TEAM_B"}
    # One job's length as it ran here: the time a job holds a worker, from start to start.
    span = (max(t(r.completed_at) for r in records) - min(t(r.started_at) for r in records)) * 2 / len(records)
    for i in b_ids:
        waited = t(by_id[i].started_at) - t(by_id[i].created_at)
        assert waited <= 2 * span, f"a job of team B waited {waited:.2f}s, over two job lengths ({span:.2f}s)"
    # While both teams had work: from the first start to team B's last completion.
    start = min(t(r.started_at) for r in records)
    end = max(t(by_id[i].completed_at) for i in b_ids)

    def used(ids: list[str]) -> float:
        return sum(max(0.0, min(t(by_id[i].completed_at), end) - max(t(by_id[i].started_at), start)) for i in ids)

    a_use, b_use = used(a_ids), used(b_ids)
    share = b_use / (a_use + b_use)
    assert abs(share - 0.5) <= 0.05, f"team B had {share:.0%} of the GPU-seconds while both had work, not 50% ± 5%"


async def test_urgent_starts_next_and_low_starts_within_the_aging_bound(tmp_path: Path, settings: Settings) -> None:
    aging = 3.0
    async with pool(tmp_path, settings, Scheduling(aging_s=aging), workers=1) as p:
        normal = [(await p.a.submit(**job(0.3))).job_id for _ in range(20)]
        p.mine_a.update(normal)
        urgent = await p.b.submit(**job(0.3, priority="urgent"))
        # At most one job is ahead: one admitted for the worker before the urgent job came.
        assert urgent.position_in_queue is not None and urgent.position_in_queue <= 1
        assert urgent.waiting in (None, "behind earlier jobs")
        behind = await p.a.get_job(normal[-1])
        assert behind.waiting == "behind higher priority"
        records = await all_done(p, [*normal, urgent.job_id], timeout=120)
        by_id = {r.job_id: r for r in records}
        # The first job the scheduler chose once the urgent one was queued (one it had already
        # handed to the worker's stream may start before it).
        after = [r for r in records if t(r.admitted_at) >= t(by_id[urgent.job_id].created_at)]
        assert min(after, key=lambda r: t(r.started_at)).job_id == urgent.job_id, "the urgent job did not start next"

        # A stream of normal jobs, kept three deep, and one low job among them.
        stream: list[str] = []
        low = await p.b.submit(**job(0.3, priority="low"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = await p.b.get_job(low.job_id)
            if info.status != "queued":
                break
            queued = [r for r in await p.records(stream[-6:]) if r.status == "queued"]
            for _ in range(max(0, 3 - len(queued))):
                stream.append((await p.a.submit(**job(0.3))).job_id)
                p.mine_a.add(stream[-1])
            await asyncio.sleep(0.1)  # the stream's pace, not a wait for a condition
        info = await all_done(p, [low.job_id], timeout=30)
        waited = t(info[0].started_at) - t(info[0].created_at)
        # Two aging periods raise it to high; then only jobs queued before it go first.
        assert waited <= 2 * aging + 2.0, f"the low job waited {waited:.1f}s, over the aging bound"
        began = t(info[0].started_at)
        overtaken = [
            r
            for r in await p.records(stream)
            if t(r.created_at) < began and (r.started_at is None or t(r.started_at) > began)
        ]
        assert overtaken, "no normal job was waiting when the low one started: the stream ran dry"


async def test_quotas_hold_running_gpus_and_refuse_queued_jobs(tmp_path: Path, settings: Settings) -> None:
    limits = Scheduling(teams={"TEAM_A": TeamPolicy(max_running_gpus=1, max_queued=3, max_priority="high")})
    async with pool(tmp_path, settings, limits, workers=2) as p:
        # One of them may start meanwhile (it leaves the queue): submit until the quota says no.
        a_ids: list[str] = []
        refused: QuotaExceeded | None = None
        for _ in range(6):
            try:
                a_ids.append((await p.a.submit(**job(0.8))).job_id)
            except QuotaExceeded as exc:
                refused = exc
                break
        p.mine_a.update(a_ids)
        assert refused is not None and 3 <= len(a_ids) <= 5, a_ids
        assert refused.code == 429 and "max_queued" in refused.message and "has 3 jobs queued" in refused.message
        with pytest.raises(InvalidField) as capped:
            await p.a.submit(**job(0.8, priority="urgent"))
        assert capped.value.path == "$.priority"
        b_ids = [(await p.b.submit(**job(0.8))).job_id for _ in range(2)]
        most = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            records = await p.records(a_ids + b_ids)
            most = max(most, sum(1 for r in records if r.team == "TEAM_A" and r.status == "running"))
            if all(r.status == "completed" for r in records):
                break
            await asyncio.sleep(0.25)  # the sampling period the contract names
        else:
            raise AssertionError("the jobs did not complete in 90s")
        assert most == 1, f"team A ran {most} jobs at once against a quota of one GPU"
        why = (await p.b.queue()).queue  # nothing waits now: the rows are empty
        assert why == {"default": []}


async def test_a_quota_holds_a_sharded_jobs_pieces_and_another_team_gets_the_rest(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_PIECE_SECONDS", "1.5")
    limits = Scheduling(teams={"TEAM_A": TeamPolicy(max_running_gpus=2)})
    async with pool(tmp_path, settings, limits, workers=3, evaluator=FAKE) as p:
        sharded = await p.a.submit(model="dummy", tasks=["fake"], limit=60, shards=6)
        p.mine_a.add(sharded.job_id)
        await eventually(
            lambda: p.a.get_job(sharded.job_id), until=lambda i: bool(i.pieces), what="the job planned", timeout=60
        )
        other = await p.b.submit(model="dummy", tasks=["fake"], limit=5)
        most, held = 0, 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            info = await p.a.get_job(sharded.job_id)
            most = max(most, sum(1 for piece in info.pieces if piece.status == "running"))
            held = max(held, sum(1 for piece in info.pieces if piece.status == "held"))
            if info.status == "completed":
                break
            await asyncio.sleep(0.25)  # the sampling period the contract names
        else:
            raise AssertionError(f"the sharded job did not complete in 90s: {info.status}")
        assert most == 2, f"team A ran {most} pieces at once against a quota of two GPUs"
        assert held >= 3, "the pieces past the quota were not held"
        (b_info,) = await all_done(p, [other.job_id], timeout=30)
        assert t(b_info.started_at) < t(info.completed_at), "team B waited for team A's pieces"
        undisturbed = await p.b.submit(model="dummy", tasks=["fake"], limit=60, shards=6)
        (alone,) = await all_done(p, [undisturbed.job_id], timeout=120)
        assert info.result is not None and alone.result is not None
        assert info.result.metrics == alone.result.metrics


async def test_a_high_job_takes_the_next_worker_a_low_sharded_job_frees(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_PIECE_SECONDS", "2")
    async with pool(tmp_path, settings, Scheduling(), workers=2, evaluator=FAKE) as p:
        sharded = await p.a.submit(model="dummy", tasks=["fake"], limit=60, shards=6, priority="low")
        p.mine_a.add(sharded.job_id)

        async def two_pieces_running() -> int:
            info = await p.a.get_job(sharded.job_id)
            return sum(1 for piece in info.pieces if piece.status == "running")

        await eventually(two_pieces_running, until=lambda n: n == 2, what="two pieces running", timeout=60)
        high = await p.b.submit(model="dummy", tasks=["fake"], limit=5, priority="high")
        done = await all_done(p, [sharded.job_id, high.job_id], timeout=120)
        low_info, high_info = done
        ended = sorted(t(piece.completed_at) for piece in low_info.pieces if piece.completed_at)
        first_free = min(e for e in ended if e >= t(high_info.created_at))
        assert t(high_info.started_at) <= first_free + 1.0, "the high job waited past the first piece that ended"
        later = [piece for piece in low_info.pieces if piece.started_at and t(piece.started_at) > first_free + 0.5]
        assert later, "the low job's other pieces ran after the high job took its worker"
        undisturbed = await p.a.submit(model="dummy", tasks=["fake"], limit=60, shards=6, priority="low")
        p.mine_a.add(undisturbed.job_id)
        (alone,) = await all_done(p, [undisturbed.job_id], timeout=120)
        assert low_info.result is not None and alone.result is not None
        assert low_info.result.metrics == alone.result.metrics


async def test_an_idle_worker_starts_an_admitted_job_at_once(tmp_path: Path, settings: Settings) -> None:
    # The shipped permissions let a worker hear jobs land: it fetches at once, not on a timer.
    async with pool(tmp_path, settings, Scheduling(), workers=1) as p:
        lags: list[float] = []
        for _ in range(5):
            accepted = await p.a.submit(**job(0.1))
            p.mine_a.add(accepted.job_id)
            (info,) = await all_done(p, [accepted.job_id], timeout=30)
            lags.append(t(info.started_at) - t(info.admitted_at))
            # The next job comes to a worker that has been idle a while, past its fetches.
            ended = t(info.completed_at)
            await eventually(lambda e=ended: time.time() - e >= 0.5, what="the worker idle", timeout=5)
    lags.sort()
    assert lags[2] <= 0.15, f"from admission to start: {', '.join(f'{lag:.3f}s' for lag in lags)}"
