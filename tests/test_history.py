"""Job history: the gateway's `jobs` endpoint, its index following the bucket, short ids."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from evalq import AmbiguousJobId, AsyncClient, JobNotFound
from evalq.config import Settings
from evalq.errors import Unavailable
from evalq.gateway import Gateway
from evalq.gateway.history import History
from evalq.schemas import JobInfo, JobResult, JobsQuery, encode
from evalq.topology import Topology

from .conftest import EVALQ, run_command, settings_env
from .jobs import JOB
from .waiting import eventually


def job_id(head: str = "") -> str:
    """A uuid4-shaped id starting with `head` (up to 8 hex digits)."""
    full = str(uuid.uuid4())
    return head + full[len(head) :]


def record(i: int, **fields: Any) -> JobInfo:
    base: dict[str, Any] = {
        "job_id": job_id(),
        "status": "completed",
        "created_at": f"2025-03-01T10:{i // 60:02d}:{i % 60:02d}.000Z",
        "pool": "default",
    }
    return JobInfo(**{**base, **fields})


async def write(nc: Any, topology: Topology, records: list[JobInfo]) -> None:
    kv = await nc.jetstream().key_value(topology.jobs_bucket)
    await asyncio.gather(*(kv.put(r.job_id, encode(r)) for r in records))


async def test_filters_status_pool_labels_and_time(nc: Any, settings: Settings, topology: Topology) -> None:
    records = [
        record(
            i,
            status=("completed", "failed", "queued")[i % 3],
            pool="gpu" if i % 2 else "default",
            labels={"run": "a" if i < 30 else "b", "step": str(i)},
        )
        for i in range(60)
    ]
    await write(nc, topology, records)
    async with Gateway(nc, settings, topology), AsyncClient(settings) as client:
        page = await client.jobs(limit=1000)
        assert [j.job_id for j in page.jobs] == [r.job_id for r in reversed(records)]
        assert page.next_cursor is None

        def ids(keep: Callable[[int, JobInfo], bool]) -> set[str]:
            return {r.job_id for i, r in enumerate(records) if keep(i, r)}

        failed = await client.jobs(status="failed", limit=1000)
        assert {j.job_id for j in failed.jobs} == ids(lambda i, r: r.status == "failed")
        several = await client.jobs(status=["failed", "queued"], pool="gpu", limit=1000)
        assert {j.job_id for j in several.jobs} == ids(lambda i, r: r.status != "completed" and r.pool == "gpu")
        labelled = await client.jobs(labels={"run": "b", "step": "31"})
        assert [j.job_id for j in labelled.jobs] == [records[31].job_id]
        assert labelled.jobs[0].labels == {"run": "b", "step": "31"}
        window = await client.jobs(created_after="2025-03-01T10:00:10Z", created_before="2025-03-01T10:00:20Z")
        assert {j.job_id for j in window.jobs} == ids(lambda i, r: 10 <= i < 20)
        both = await client.jobs(labels={"run": "a"}, status="queued", created_after="2025-03-01T10:00:15+00:00")
        assert {j.job_id for j in both.jobs} == ids(lambda i, r: i < 30 and r.status == "queued" and i >= 15)
        assert (await client.jobs(labels={"run": "zzz"})).jobs == []


async def test_pages_have_no_gaps_or_duplicates_while_jobs_arrive(
    nc: Any, settings: Settings, topology: Topology
) -> None:
    records = [record(i, status="queued") for i in range(95)]
    await write(nc, topology, records)
    async with Gateway(nc, settings, topology), AsyncClient(settings) as client:
        seen: list[str] = []
        cursor = None
        while True:
            page = await client.jobs(limit=20, cursor=cursor)
            seen += [j.job_id for j in page.jobs]
            await client.submit(**JOB)  # newer than every page still to come: never in them
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == [r.job_id for r in reversed(records)]
        assert len(seen) == len(set(seen)) == 95
        everything = [j.job_id async for j in client.iter_jobs(page_size=7)]
        assert len(everything) == len(set(everything)) == 95 + 5
        assert everything[5:] == seen
        # Jobs created in one millisecond still have an order of their own, not their ids'.
        await asyncio.gather(*(client.submit(**JOB) for _ in range(50)))
        created = [j.created_at for j in (await client.jobs(limit=50)).jobs]
        assert len(set(created)) == 50 and created == sorted(created, reverse=True)


async def test_the_index_follows_the_bucket(nc: Any, settings: Settings, client: AsyncClient) -> None:
    accepted = await client.submit(**JOB, labels={"run": "x"})
    # This gateway wrote the record: listed at once, not after the watch's delay.
    listed = await client.jobs(labels={"run": "x"})
    assert [(j.job_id, j.status) for j in listed.jobs] == [(accepted.job_id, "queued")]
    await client.cancel_job(accepted.job_id)

    async def cancelled() -> bool:
        page = await client.jobs(status="cancelled")
        return [j.job_id for j in page.jobs] == [accepted.job_id]

    await eventually(cancelled, timeout=10, what="the cancelled job in the index", interval=0.02)
    assert (await client.jobs(status="queued")).jobs == []
    # A record written by another process, with metrics, then deleted.
    topology = Topology.from_settings(settings)
    done = record(0, result=JobResult(metrics={"demo": {"acc,none": 0.5, "acc_stderr,none": 0.1}}))
    await write(nc, topology, [done])

    async def metrics() -> Any:
        page = await client.jobs(status="completed", metrics=["demo/acc"])
        return page.jobs and page.jobs[0].metrics

    shown = await eventually(metrics, timeout=10, what="the written record in the index", interval=0.02)
    assert shown == {"demo": {"acc,none": 0.5}}
    assert (await client.jobs(status="completed")).jobs[0].metrics == {}
    assert (await client.jobs(status="completed", metrics=["*"])).jobs[0].metrics["demo"]["acc_stderr,none"] == 0.1
    await (await nc.jetstream().key_value(topology.jobs_bucket)).delete(done.job_id)

    async def gone() -> bool:
        return (await client.jobs(status="completed")).jobs == []

    await eventually(gone, timeout=10, what="the deleted record gone from the index", interval=0.02)


async def test_short_ids_resolve_or_are_refused(nc: Any, settings: Settings, topology: Topology) -> None:
    twins = [record(0, job_id=job_id("abcd1")), record(1, job_id=job_id("abcd2"))]
    single = record(2, job_id=job_id("0123"))
    await write(nc, topology, [*twins, single])
    async with Gateway(nc, settings, topology), AsyncClient(settings) as client:
        assert await client.resolve(single.job_id[:4]) == single.job_id
        assert await client.resolve(twins[0].job_id[:5].upper()) == twins[0].job_id
        assert await client.resolve(single.job_id) == single.job_id
        with pytest.raises(AmbiguousJobId) as ambiguous:
            await client.resolve("abcd")
        assert {c.job_id for c in ambiguous.value.candidates} == {t.job_id for t in twins}
        assert twins[0].job_id in str(ambiguous.value) and twins[1].job_id in str(ambiguous.value)
        for unknown in ("fff", "not-hex"):
            with pytest.raises(JobNotFound):
                await client.resolve(unknown)


@pytest.mark.parametrize(
    ("body", "code", "path"),
    [
        ({"limit": 0}, "422", "$.limit"),
        ({"limit": 1001}, "422", "$.limit"),
        ({"status": ["bogus"]}, "422", "$.status[0]"),
        ({"created_after": "yesterday"}, "422", "$.created_after"),
        ({"created_before": "2025-03-01T10:00:00"}, "422", "$.created_before"),
        ({"labels": {"bad key": "x"}}, "422", "$.labels"),
        ({"metrics": ["acc"]}, "422", "$.metrics[0]"),
        ({"id_prefix": "XYZ"}, "422", "$.id_prefix"),
        ({"cursor": "!!"}, "422", "$.cursor"),
        ({"limits": 3}, "422", "$"),
        (b'{"limit": ', "400", "$"),
    ],
)
async def test_bad_queries_are_refused_with_a_path(
    nc: Any, gateway: Gateway, topology: Topology, body: Any, code: str, path: str
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = await nc.request(topology.subject("jobs"), data, timeout=10)
    assert reply.headers["Nats-Service-Error-Code"] == code
    error = json.loads(reply.data)["error"]
    assert error["path"] == path, error


async def test_a_loading_history_answers_503(nc: Any, topology: Topology) -> None:
    history = History(await nc.jetstream().key_value(topology.jobs_bucket))
    with pytest.raises(Unavailable, match="loading"):
        history.page(JobsQuery(), max_bytes=1 << 20)


async def test_a_page_stays_under_the_payload_limit(nc: Any, settings: Settings, topology: Topology) -> None:
    big = {"task": {f"metric_{k},none": 0.5 for k in range(40)}}
    await write(nc, topology, [record(i, result=JobResult(metrics=big), error="x" * 5000) for i in range(120)])
    async with Gateway(nc, settings, topology) as gateway, AsyncClient(settings) as client:
        gateway.nc._max_payload = 64 * 1024  # as a server with a small max_payload would say
        pages = []
        cursor = None
        while True:
            page = await client.jobs(limit=1000, metrics=["*"], cursor=cursor)
            pages.append(page)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert len(pages) > 1 and all(len(encode(p)) < 64 * 1024 for p in pages)
        assert sum(len(p.jobs) for p in pages) == 120
        assert all(len(j.error or "") <= 501 for p in pages for j in p.jobs)


async def test_cli_jobs_metric_columns_csv_json_and_short_ids(
    nc: Any, settings: Settings, topology: Topology, gateway: Gateway
) -> None:
    metrics = {"evalq_demo": {"exact_match,none": 0.75, "exact_match_stderr,none": 0.1}}
    done = record(1, job_id=job_id("c0ffee"), result=JobResult(metrics=metrics), labels={"run": "[bold]x[/bold]"})
    other = record(2, job_id=job_id("c0ffef"), status="failed", labels={"run": "b"})
    await write(nc, topology, [done, other])

    async def evalq(*args: str) -> tuple[int, str, str]:
        return await run_command([*EVALQ, *args], settings_env(settings, COLUMNS="200"), 60)

    async def listed() -> bool:
        return len(gateway.history.index) == 2

    await eventually(listed, timeout=10, what="both records in the index", interval=0.02)
    code, out, err = await evalq("jobs", "--metric", "evalq_demo/exact_match", "--label", "run=[bold]x[/bold]")
    assert code == 0, err
    assert done.job_id[:8] in out and done.job_id[:9] not in out and other.job_id[:8] not in out
    assert "evalq_demo/exact_match" in out and "0.75" in out and "run=[bold]x[/bold]" in out
    code, out, err = await evalq("jobs", "--csv", "--metric", "evalq_demo/exact_match", "--metric", "evalq_demo/none")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][-2:] == ["evalq_demo/exact_match", "evalq_demo/none"]
    assert [r[0] for r in rows[1:]] == [other.job_id, done.job_id]
    assert rows[2][-2:] == ["0.75", ""] and rows[1][-2:] == ["", ""]
    code, out, err = await evalq("jobs", "--json", "--status", "completed")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [j["job_id"] for j in lines] == [done.job_id] and lines[0]["metrics"] == metrics
    code, out, err = await evalq("status", "c0ffee", "--json")
    assert code == 0 and json.loads(out)["job_id"] == done.job_id, err
    code, out, err = await evalq("status", "c0ffe")
    assert code == 1 and done.job_id in err and other.job_id in err and "ambiguous" in err
    code, _, err = await evalq("cancel", "999999")
    assert code == 1 and "no job id starts with 999999" in err
    code, _, err = await evalq("jobs", "--since", "yesterday")
    assert code == 2 and "--since" in err and "Traceback" not in err
