"""Teams: a job records the account (and user) nats-server says sent it, never the request.

With deploy/nats/accounts.conf, a request crosses a service import into EVALQ, and the
server writes the requester's identity into its `Nats-Request-Info` header, replacing any
the client sent. Without accounts nothing crosses an import, and every job is `default`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.errors import InvalidField, JobNotFound
from evalq.gateway import Gateway
from evalq.gateway.history import JobIndex, summarize
from evalq.gateway.identity import REQUEST_INFO, Requester, requester
from evalq.schemas import JobAccepted, JobInfo, JobsQuery, encode
from evalq.topology import Topology

from .conftest import EVALQ, run_command, settings_env
from .jobs import JOB
from .test_auth import ACCOUNTS, Violations, accounts_server, as_user
from .waiting import eventually

FORGED = {REQUEST_INFO: json.dumps({"acc": "TEAM_B", "user": "bob"})}


def two_teams() -> str:
    """The shipped file plus TEAM_A (a copy of SUBMITTERS) and TEAM_B (the file's commented
    example, uncommented), each with literal passwords."""
    text = ACCOUNTS.read_text()
    block = re.search(r"(?ms)^  SUBMITTERS \{.*?^  \}$", text)
    example = re.search(r"(?ms)^  # TEAM_B \{.*?^  # \}$", text)
    assert block and example, "accounts.conf no longer has SUBMITTERS or the TEAM_B example"
    team_a = (
        block.group(0)
        .replace("SUBMITTERS", "TEAM_A")
        .replace("user = submitter", "user = alice")
        .replace("$EVALQ_SUBMITTER_PASSWORD", '"pw-a"')
    )
    team_b = re.sub(r"(?m)^  # ?", "  ", example.group(0)).replace("$EVALQ_TEAM_B_PASSWORD", '"pw-b"')
    end = text.rindex("}")
    return f"{text[:end]}\n{team_a}\n{team_b}\n{text[end:]}"


def member(base: Settings, url: str, user: str, password: str) -> Settings:
    """A submitter of another team's account: the settings accounts.conf tells its users to set."""
    return base.with_(
        nats_url=[url],
        prefix="evalq",
        user=user,
        password=password,
        request_timeout=3.0,
        inbox_prefix="_INBOX_submitter",
    )


async def raw_submit(nc: Any, subject: str, body: dict[str, Any], headers: dict[str, str]) -> JobAccepted:
    reply = await nc.request(subject, encode(body), headers=headers, timeout=5)
    assert not (reply.headers or {}).get("Nats-Service-Error-Code"), reply.data
    return msgspec.json.decode(reply.data, type=JobAccepted)


async def test_the_shipped_accounts_record_team_submitters_and_user_submitter(
    tmp_path: Path, settings: Settings
) -> None:
    with accounts_server(tmp_path) as server:
        gateway_settings = as_user(settings, server, "gateway")
        gateway_nc = await connect(gateway_settings)
        seen: list[Any] = []

        async def observe(msg: Any) -> None:
            seen.append(msg)

        # A plain subscriber beside the gateway's queue group gets a copy of each request
        # as the server delivers it into EVALQ (on a connection of its own: one that answers
        # may send one reply to each request it is given, and would be given two).
        observer = await connect(gateway_settings)
        await observer.subscribe("evalq.submit", cb=observe)
        submitter = as_user(settings, server, "submitter")
        try:
            async with Gateway(gateway_nc, gateway_settings), AsyncClient(submitter) as client:
                accepted = await client.submit(**JOB)
                info = await client.get_job(accepted.job_id)
                assert (info.team, info.user) == ("SUBMITTERS", "submitter")

                # A header the client made is replaced by the server's on the way across.
                submitter_nc = await connect(submitter)
                try:
                    forged = await raw_submit(submitter_nc, "evalq.submit", JOB, FORGED)
                finally:
                    await submitter_nc.close()
                info = await client.get_job(forged.job_id)
                assert (info.team, info.user) == ("SUBMITTERS", "submitter")
                await eventually(lambda: len(seen), until=lambda n: n == 2, what="both requests", timeout=10)
                for msg in seen:
                    stated = json.loads(msg.headers[REQUEST_INFO])
                    assert (stated["acc"], stated["user"]) == ("SUBMITTERS", "submitter")
                    assert msg.reply.startswith("_R_.")

                # Inside EVALQ a client's header would pass as sent; no user there may send
                # to the endpoints, so every request the gateway gets crossed an import.
                for role in ("gateway", "worker"):
                    violations = Violations()
                    insider = await connect(as_user(settings, server, role), error_cb=violations.on_error)
                    try:
                        await insider.publish("evalq.submit", encode(JOB), reply=insider.new_inbox(), headers=FORGED)
                        assert "evalq.submit" in (await violations.wait()).lower()
                    finally:
                        await insider.close()

                # No request field names a team.
                with pytest.raises(InvalidField) as refused:
                    await client.submit(**JOB, team="TEAM_B")
                assert refused.value.code == 422 and "team" in refused.value.message and refused.value.path == "$"

                page = await eventually(
                    lambda: client.jobs(team="SUBMITTERS"),
                    until=lambda p: len(p.jobs) == 2,
                    what="the team's jobs",
                    timeout=10,
                )
                assert {j.team for j in page.jobs} == {"SUBMITTERS"}
                # A team's history is its own, whatever team the query names.
                assert {j.job_id for j in (await client.jobs(team="default")).jobs} == {j.job_id for j in page.jobs}
                # The two jobs and the refused body; none from inside EVALQ.
                assert len(seen) == 3
                assert all(json.loads(msg.headers[REQUEST_INFO])["acc"] == "SUBMITTERS" for msg in seen)
        finally:
            await observer.close()
            await gateway_nc.close()


async def test_each_team_account_records_its_own_team(tmp_path: Path, settings: Settings) -> None:
    with accounts_server(tmp_path, two_teams()) as server:
        gateway_settings = as_user(settings, server, "gateway")
        gateway_nc = await connect(gateway_settings)
        alice = member(settings, server.url, "alice", "pw-a")
        team_b = member(settings, server.url, "team_b", "pw-b")
        try:
            async with (
                Gateway(gateway_nc, gateway_settings),
                AsyncClient(alice) as a,
                AsyncClient(team_b) as b,
                AsyncClient(as_user(settings, server, "submitter")) as s,
            ):
                jobs = {
                    "TEAM_A": (await a.submit(**JOB)).job_id,
                    "TEAM_B": (await b.submit(**JOB)).job_id,
                    "SUBMITTERS": (await s.submit(**JOB)).job_id,
                }
                expected = {"TEAM_A": "alice", "TEAM_B": "team_b", "SUBMITTERS": "submitter"}
                clients = {"TEAM_A": a, "TEAM_B": b, "SUBMITTERS": s}
                for team, job_id in jobs.items():
                    info = await clients[team].get_job(job_id)
                    assert (info.team, info.user) == (team, expected[team])
                    # Another team's job is no job at all to the gateway: not shown, not cancelled.
                    for other, client in clients.items():
                        if other != team:
                            with pytest.raises(JobNotFound):
                                await client.get_job(job_id)
                            with pytest.raises(JobNotFound):
                                await client.cancel_job(job_id)
                    assert (await clients[team].get_job(job_id)).status == "queued"
                # TEAM_B claiming TEAM_A's name in the header stays TEAM_B.
                b_nc = await connect(team_b)
                try:
                    claimed = {REQUEST_INFO: json.dumps({"acc": "TEAM_A", "user": "alice"})}
                    forged = await raw_submit(b_nc, "evalq.submit", JOB, claimed)
                finally:
                    await b_nc.close()
                assert (await b.get_job(forged.job_id)).team == "TEAM_B"
                with pytest.raises(JobNotFound):
                    await a.get_job(forged.job_id)
                # A team's history is its own jobs, whatever team the query names.
                page = await eventually(
                    lambda: b.jobs(), until=lambda p: len(p.jobs) == 2, what="TEAM_B's jobs", timeout=10
                )
                assert {j.job_id for j in page.jobs} == {jobs["TEAM_B"], forged.job_id}
                assert [j.job_id for j in (await a.jobs(team="TEAM_B")).jobs] == [jobs["TEAM_A"]]
                # An Idempotency-Key is the team's own: the same key from two teams makes two
                # jobs, and neither team is told of the other's (no 409 naming it).
                first = await a.submit(**JOB, idempotency_key="nightly-42")
                other = await b.submit(**{**JOB, "limit": 5}, idempotency_key="nightly-42")
                assert first.job_id != other.job_id and not other.duplicate
                again = await a.submit(**JOB, idempotency_key="nightly-42")
                assert again.job_id == first.job_id and again.duplicate
        finally:
            await gateway_nc.close()


async def test_without_accounts_every_job_is_team_default(
    nc: Any, settings: Settings, client: AsyncClient, topology: Topology
) -> None:
    accepted = await client.submit(**JOB)
    info = await client.get_job(accepted.job_id)
    assert (info.team, info.user) == ("default", None)
    # In one account the server passes a client's header as sent: the gateway ignores it.
    forged = await raw_submit(nc, topology.subject("submit"), JOB, FORGED)
    info = await client.get_job(forged.job_id)
    assert (info.team, info.user) == ("default", None)
    # Nor can a client pass for a request carried across an import: the server refuses a
    # reply subject under `_R_.` from any client, and the gateway never sees the request.
    violations = Violations()
    own = await connect(settings, error_cb=violations.on_error)
    try:
        await own.publish(topology.subject("submit"), encode(JOB), reply="_R_.made.up", headers=FORGED)
        assert "publish with reply of" in await violations.wait()
    finally:
        await own.close()
    page = await eventually(
        lambda: client.jobs(team="default"), until=lambda p: len(p.jobs) == 2, what="both jobs", timeout=10
    )
    assert {j.team for j in page.jobs} == {"default"}
    assert (await client.jobs(team="TEAM_B")).jobs == []


def test_the_header_is_read_only_on_a_request_that_crossed_an_import() -> None:
    across = "_R_.wQ7Rcd.FZoo7B"
    shared = {REQUEST_INFO: json.dumps({"acc": "TEAM_A", "user": "alice", "rtt": 1, "kind": "Client"})}
    assert requester(shared, across) == Requester(team="TEAM_A", user="alice")
    # An import without `share` states the account only.
    assert requester({REQUEST_INFO: '{"acc":"TEAM_A","rtt":5}'}, across) == Requester(team="TEAM_A")
    anonymous = Requester()
    assert anonymous.team == "default" and anonymous.user is None and not anonymous.admin
    # Sent inside the queue's own account: an operator's request, which sees every team.
    own = Requester(admin=True)
    assert requester(shared, "_INBOX.abc.def") == own
    assert requester(shared, None) == own
    assert own.may_see("TEAM_A") and Requester(team="TEAM_A").may_see("TEAM_A")
    assert not Requester(team="TEAM_B").may_see("TEAM_A") and not anonymous.may_see("TEAM_A")
    assert requester(None, across) == anonymous
    for unreadable in ("not json", '{"acc": 5}', '{"user": "alice"}', "[]"):
        assert requester({REQUEST_INFO: unreadable}, across) == anonymous


def test_the_index_filters_by_team_walking_or_sorting() -> None:
    index = JobIndex()
    for i in range(100):
        team = "TEAM_A" if i % 20 == 0 else "default"
        record = JobInfo(
            job_id=f"00000000-0000-4000-8000-{i:012d}",
            status="completed",
            created_at=f"2025-03-01T10:{i // 60:02d}:{i % 60:02d}.000Z",
            team=team,
            user="alice" if team == "TEAM_A" else None,
        )
        index.put(summarize(encode(record)), i + 1)
    selective = index.page(JobsQuery(team="TEAM_A"))
    assert [j.job_id[-2:] for j in selective.jobs] == ["80", "60", "40", "20", "00"]
    walked = index.page(JobsQuery(team="default", limit=1000))
    assert len(walked.jobs) == 95 and {j.team for j in walked.jobs} == {"default"}
    assert index.page(JobsQuery(team="TEAM_A", status=["failed"])).jobs == []
    # A record written before teams were recorded reads as team default.
    legacy = b'{"job_id":"00000000-0000-4000-8000-999999999999","status":"queued","created_at":"2025-03-01T11:00:00Z"}'
    assert summarize(legacy).team == "default"


async def test_cli_jobs_team_filter_and_status_show_team_and_user(
    nc: Any, settings: Settings, topology: Topology, gateway: Gateway
) -> None:
    mine = JobInfo(
        job_id="c0ffee00-0000-4000-8000-000000000001",
        status="completed",
        created_at="2025-03-01T10:00:01.000Z",
        team="TEAM_A",
        user="alice",
    )
    other = JobInfo(job_id="c0ffee00-0000-4000-8000-000000000002", status="failed", created_at="2025-03-01T10:00:02Z")
    kv = await nc.jetstream().key_value(topology.jobs_bucket)
    for r in (mine, other):
        await kv.put(r.job_id, encode(r))
    await eventually(lambda: len(gateway.history.index), until=lambda n: n == 2, what="the index", timeout=10)

    async def evalq(*args: str) -> tuple[int, str, str]:
        return await run_command([*EVALQ, *args], settings_env(settings, COLUMNS="200"), 60)

    code, out, err = await evalq("jobs", "--team", "TEAM_A", "--csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["job_id"], r["team"]) for r in rows] == [(mine.job_id, "TEAM_A")]
    code, out, err = await evalq("jobs", "--team", "default")
    assert code == 0 and other.job_id[:8] in out and "TEAM_A" not in out, err
    code, out, err = await evalq("status", mine.job_id)
    assert code == 0, err
    assert re.search(r"team\s+TEAM_A", out) and re.search(r"user\s+alice", out)
    code, out, err = await evalq("status", other.job_id)
    assert code == 0 and re.search(r"team\s+default", out) and "user" not in out, err
