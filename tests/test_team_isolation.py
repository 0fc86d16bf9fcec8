"""Isolation between teams, enforced by nats-server with deploy/nats/accounts.conf.

Two teams (TEAM_A and TEAM_B, separate accounts and users) and an admin (a user of the
queue's own account) on the shipped file. Team B's user must not read team A's status,
events, results, history or samples, nor cancel its jobs: not through the SDK, the CLI, raw
requests and subscriptions, the web pages nor lmms-eval's API. Each refusal is nats-server's
(a permissions violation, or a message that never reaches the account) or the gateway's
404. The admin sees both teams.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.errors import JobNotFound, ServerNotFound
from evalq.schemas import decode_event, encode
from evalq.web import create_app

from .conftest import EVALQ, run_command, settings_env
from .jobs import JOB
from .test_auth import Violations, accounts_server, gateway_and_worker, server_env
from .test_teams import member, two_teams
from .waiting import eventually

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "pw-admin"
# A job of team A with results and samples to be kept from team B.
SAMPLED = {**JOB, "model_args": "samples=3", "log_samples": True, "limit": 3}


def shipped_with_admin() -> str:
    """The shipped file with two teams and its commented admin user enabled."""
    text = two_teams()
    line = "      # { user = admin, password = $EVALQ_ADMIN_PASSWORD, permissions = $SUBMITTER_PERMISSIONS }"
    assert line in text, "accounts.conf no longer has the admin example"
    return text.replace(line, line.replace("# ", "", 1).replace("$EVALQ_ADMIN_PASSWORD", f'"{ADMIN_PASSWORD}"'))


@pytest.fixture
async def pool(tmp_path: Path, settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """A gateway and a worker on the shipped accounts, and a client of each team and the admin."""
    with accounts_server(tmp_path, shipped_with_admin()) as server:
        async with gateway_and_worker(settings, server):
            people = {
                "a": member(settings, server.url, "alice", "pw-a"),
                "b": member(settings, server.url, "team_b", "pw-b"),
                "admin": member(settings, server.url, "admin", ADMIN_PASSWORD),
            }
            clients = {name: await AsyncClient(chosen).connect() for name, chosen in people.items()}
            try:
                yield {"server": server, "settings": people, **clients}
            finally:
                for client in clients.values():
                    await client.close()


async def test_a_team_reads_and_cancels_nothing_of_another_teams_through_the_sdk_and_raw_nats(
    pool: dict[str, Any], tmp_path: Path
) -> None:
    a: AsyncClient = pool["a"]
    b: AsyncClient = pool["b"]
    admin: AsyncClient = pool["admin"]
    # Subscriptions first, so that every event of the jobs below is published after them.
    seen: dict[str, list[str]] = {"b": [], "admin": []}

    async def listen(who: str, subject: str) -> Any:
        async def got(msg: Any) -> None:
            seen[who].append(decode_event(msg.data).job_id)

        sub = await pool[who].nc.subscribe(subject, cb=got)
        await pool[who].nc.flush()
        return sub

    await listen("b", "evalq.events.>")
    await listen("b", "evalq.events.TEAM_A.>")
    await listen("admin", "evalq.events.>")

    job_a = (await a.submit(**SAMPLED)).job_id
    done = await a.wait_for_job(job_a, timeout=60)
    assert done.team == "TEAM_A" and done.result is not None
    samples = [name for name in done.result.artifacts if "_samples_" in name]
    assert samples, done.result.artifacts
    assert await a.results(job_a, tmp_path / "a")  # team A reads its own
    job_b = (await b.submit(**JOB)).job_id
    await b.wait_for_job(job_b, timeout=60)

    # Status, cancel, results, samples, events, history: a 404 from the gateway, or nothing.
    for refused in (
        b.get_job(job_a),
        b.cancel_job(job_a),
        b.results(job_a, tmp_path / "b"),
        b.artifact(job_a, "results.json"),
        b.artifact(job_a, samples[0][len(job_a) + 1 :]),
        b.reads.object_info(f"{job_a}/results.json"),
        b.reads.events(job_id=job_a),
    ):
        with pytest.raises(JobNotFound):
            await refused
    with pytest.raises(JobNotFound):
        async for _ in b.events(job_a, history=True):
            pass
    assert job_a not in {j.job_id for j in (await b.jobs()).jobs}
    assert job_a not in {j.job_id for j in (await b.jobs(team="TEAM_A")).jobs}
    stored = (await b.reads.events()).events
    assert {decode_event(bytes(e.event)).job_id for e in stored} == {job_b}
    assert (await a.get_job(job_a)).status == "completed"  # the cancel changed nothing

    # Live: team A's events never reach team B's account, whatever it subscribes to; its own do.
    await eventually(lambda: list(seen["b"]), until=lambda ids: job_b in ids, what="team B's own events", timeout=10)
    await eventually(
        lambda: list(seen["admin"]), until=lambda ids: {job_a, job_b} <= set(ids), what="the admin's events", timeout=10
    )
    assert job_a not in seen["b"]

    # Raw: a direct read of the queue's streams is refused by the server's permissions.
    violations = Violations()
    raw = await connect(pool["settings"]["b"].with_(), error_cb=violations.on_error)
    try:
        for subject in (
            "$JS.evalq.API.STREAM.MSG.GET.KV_evalq-jobs",
            "$JS.evalq.API.STREAM.MSG.GET.EVALQ_EVENTS",
            "$JS.API.STREAM.MSG.GET.OBJ_evalq-results",
        ):
            await raw.publish(subject, json.dumps({"last_by_subj": f"$KV.evalq-jobs.{job_a}"}).encode())
            assert subject.lower() in (await violations.wait()).lower()
        # Raw requests to the gateway: the same 404s as through the SDK.
        for endpoint, body in (
            ("evalq.status", {"job_id": job_a}),
            ("evalq.cancel", {"job_id": job_a}),
            ("evalq.read", {"op": "events", "job_id": job_a}),
            ("evalq.read", {"op": "object", "name": f"{job_a}/results.json"}),
            ("evalq.read", {"op": "chunk", "name": f"{job_a}/results.json"}),
        ):
            reply = await raw.request(endpoint, encode(body), timeout=5)
            assert (reply.headers or {}).get("Nats-Service-Error-Code") == "404", (endpoint, body, reply.data)
    finally:
        await raw.close()

    # The admin sees and reads both teams' jobs.
    assert (await admin.get_job(job_a)).team == "TEAM_A" and (await admin.get_job(job_b)).team == "TEAM_B"
    assert {j.job_id for j in (await admin.jobs()).jobs} >= {job_a, job_b}
    assert await admin.results(job_a, tmp_path / "admin")
    every = {decode_event(bytes(e.event)).job_id for e in (await admin.reads.events()).events}
    assert every >= {job_a, job_b}


async def test_a_team_cannot_import_another_teams_events(tmp_path: Path) -> None:
    """The export names the importer's account as the subject's third token: an account that
    imports another's events is refused when the server loads its configuration."""
    text = two_teams().replace('subject = "evalq.events.TEAM_B.>"', 'subject = "evalq.events.TEAM_A.>"')
    assert "evalq.events.TEAM_A.>" in text.split("TEAM_B {")[-1]
    (tmp_path / "accounts.conf").write_text(text)
    config = tmp_path / "auth.conf"
    config.write_text('include "accounts.conf"\n')
    server = EmbeddedServer(tmp_path / "store", config_file=config, env=server_env())
    with pytest.raises(ServerNotFound) as refused:
        server.start()
    server.stop()
    assert "evalq.events.TEAM_A.>" in str(refused.value), refused.value
    # The same file with the right import starts: the refusal is the import's.
    (tmp_path / "right").mkdir()
    with accounts_server(tmp_path / "right", two_teams()):
        pass


async def test_the_cli_web_pages_and_lmms_eval_api_of_team_b_refuse_team_as_jobs(
    pool: dict[str, Any], tmp_path: Path
) -> None:
    a: AsyncClient = pool["a"]
    b: AsyncClient = pool["b"]
    job_a = (await a.submit(**SAMPLED)).job_id
    done = await a.wait_for_job(job_a, timeout=60)
    assert done.result is not None
    sample = next(name for name in done.result.artifacts if "_samples_" in name)[len(job_a) + 1 :]

    chosen = pool["settings"]["b"]
    env = settings_env(
        chosen,
        EVALQ_USER="team_b",
        EVALQ_PASSWORD="pw-b",
        EVALQ_INBOX_PREFIX="_INBOX_submitter",
        EVALQ_PREFIX="evalq",
        COLUMNS="200",
    )
    for args in (["status", job_a], ["cancel", job_a], ["results", job_a, "-o", str(tmp_path / "cli")]):
        code, out, err = await run_command([*EVALQ, *args], env, 60)
        assert code != 0 and re.search(r"(?i)no job", out + err), (args, code, out, err)
    code, out, err = await run_command([*EVALQ, "jobs", "--json"], env, 60)
    assert code == 0 and job_a not in out, err

    ui = chosen.with_(lmms_eval_api=True).ui
    base = f"http://{ui.ui_host}:{ui.ui_port}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(b, ui)), base_url=base) as web:
        for path in (
            f"/api/jobs/{job_a}",
            f"/api/jobs/{job_a}/log",
            f"/api/jobs/{job_a}/samples",
            f"/api/jobs/{job_a}/files/results.json",
            f"/api/jobs/{job_a}/files/{sample}",
            f"/jobs/{job_a}",
            f"/jobs/{job_a}/files/results.json",
        ):
            response = await web.get(path, headers={"X-Evalq-Ui": "1"})
            assert response.status_code == 404, (path, response.status_code, response.text[:200])
        response = await web.delete(f"/jobs/{job_a}")
        assert response.status_code == 404, response.text
        listed = (await web.get("/api/jobs", headers={"X-Evalq-Ui": "1"})).json()
        assert job_a not in {row["job_id"] for row in listed["jobs"]}
    assert (await a.get_job(job_a)).status == "completed"


async def test_a_team_neither_learns_nor_rescores_another_teams_running_job(
    pool: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    a: AsyncClient = pool["a"]
    b: AsyncClient = pool["b"]
    admin: AsyncClient = pool["admin"]
    done = (await a.submit(**JOB)).job_id
    await a.wait_for_job(done, timeout=60)
    # Re-scoring names its source: another team's is no job at all, whatever its state.
    with pytest.raises(JobNotFound) as refused:
        await b.submit(**{**JOB, "rescore_of": done})
    assert refused.value.path == "$.rescore_of"

    monkeypatch.setenv("FAKE_EVAL_MODE", "slow")
    running = (await a.submit(**JOB)).job_id
    await eventually(
        lambda: a.get_job(running), until=lambda i: i.status == "running", what="A's job running", timeout=30
    )

    def current(workers: list[Any]) -> set[str | None]:
        return {w.current_job for w in workers}

    await eventually(
        a.health, until=lambda h: current(h.workers) == {running}, what="A sees its job on the worker", timeout=30
    )
    assert current((await admin.health()).workers) == {running}
    assert current((await b.health()).workers) == {None}
    queue = await b.queue()
    assert current(queue.workers) == {None} and running not in queue.running_jobs
    await a.cancel_job(running)
