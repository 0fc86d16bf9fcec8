"""The dashboard's routes in-process, against a real nats-server and gateway: its security
headers, its downloads, its read-only default and its cancel's header check, where no
browser is installed.

The app is called through httpx's ASGI transport in the test's own event loop, where the
`AsyncClient` it answers with lives (a client on another loop could not use that connection).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from importlib import resources
from typing import Any

import httpx
import msgspec
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.schemas import Work
from evalq.topology import Topology
from evalq.web import create_app

from .checkpoint_job import TURNAROUND, checkpoint_job
from .jobs import JOB, mark_completed
from .waiting import eventually

# The policy the design promises for every page: only the process's own script and style,
# images from it or data: URIs, no framing, no forms, no base.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ARTIFACT_CSP = "default-src 'none'; sandbox"
XSS = "<img src=x onerror=alert(1)>"
HTML = {"Accept": "text/html,application/xhtml+xml"}
DASHBOARD = {"X-Evalq-Ui": "1"}


@pytest.fixture
async def dashboard(settings: Settings, client: AsyncClient) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Open the web app with these UI settings over `client`; each one is closed at teardown."""
    opened: list[httpx.AsyncClient] = []

    def open_app(**ui: Any) -> httpx.AsyncClient:
        chosen = settings.with_(**ui).ui
        app = create_app(client, chosen)
        # The app answers only its own names (webguard.py): the bind address with its port.
        base = f"http://{chosen.ui_host}:{chosen.ui_port}"
        opened.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base))
        return opened[-1]

    yield open_app
    for http in opened:
        await http.aclose()


@pytest.fixture
def web(dashboard: Callable[..., httpx.AsyncClient]) -> httpx.AsyncClient:
    """The dashboard as it starts by default: read-only."""
    return dashboard()


def assert_json(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-content-type-options"] == "nosniff"
    return response.json()


async def test_pages_carry_the_policy_and_assets_are_served_as_what_they_are(
    web: httpx.AsyncClient, client: AsyncClient
) -> None:
    accepted = await client.submit(**JOB)
    pages = [
        "/",
        "/jobs?status=completed",
        f"/jobs/{accepted.job_id}",
        f"/jobs/{accepted.job_id[:8]}",
        "/trends",
        "/compare?jobs=a,b",
    ]
    shells = set()
    for path in pages:
        page = await web.get(path, headers=HTML)
        assert page.status_code == 200, path
        assert page.headers["content-type"] == "text/html; charset=utf-8", path
        assert page.headers["content-security-policy"] == PAGE_CSP, path
        assert page.headers["x-content-type-options"] == "nosniff", path
        assert page.headers["referrer-policy"] == "no-referrer", path
        shells.add(page.text)
    (shell,) = shells
    # Under that policy an inline script, style or handler would not run: the page has none.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", shell), "an inline script"
    assert not re.search(r"<style\b|\sstyle=|\son\w+=", shell), "an inline style or event handler"
    assets = re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)=\"([^\"]+)\"", shell)
    assert sorted(assets) == ["/ui/app.js", "/ui/style.css"]
    types = {"/ui/app.js": "text/javascript; charset=utf-8", "/ui/style.css": "text/css; charset=utf-8"}
    for path in assets:
        asset = await web.get(path)
        assert asset.status_code == 200, path
        assert asset.headers["content-type"] == types[path], path
        assert asset.headers["x-content-type-options"] == "nosniff", path
        assert asset.content == resources.files("evalq").joinpath("ui", path.rsplit("/", 1)[-1]).read_bytes()
    assert_json(await web.get("/ui/index.html"), 404)  # only the named assets, nothing else of the package
    # A script asking a page's path for JSON gets the routes behind it, never the shell.
    index = await web.get("/", headers={"Accept": "application/json"})
    assert index.json()["service"] == "evalq" and "content-security-policy" not in index.headers


async def test_a_label_with_markup_comes_back_as_json_text(web: httpx.AsyncClient, client: AsyncClient) -> None:
    accepted = await client.submit(**JOB, labels={"note": XSS})
    answers = [
        await web.get(f"/api/jobs/{accepted.job_id}"),
        await web.get("/api/compare", params={"jobs": accepted.job_id}),
        await web.get("/api/jobs", params={"label": f"note={XSS}"}),
    ]
    job, compared, listed = (assert_json(answer) for answer in answers)
    assert job["job"]["labels"] == {"note": XSS}
    assert [j["labels"] for j in compared["jobs"]] == [{"note": XSS}]
    assert [(j["job_id"], j["labels"]) for j in listed["jobs"]] == [(accepted.job_id, {"note": XSS})]
    for answer in answers:
        assert answer.headers["cache-control"] == "no-store"
        # The label is a JSON string in a JSON document: nothing a browser would take for a page.
        assert json.dumps(XSS) in answer.text and "text/html" not in answer.headers["content-type"]


async def test_a_job_carries_its_work_and_the_job_it_rescores(
    web: httpx.AsyncClient, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    source = (await client.submit(**JOB)).job_id
    await mark_completed(nc, topology, source, Work(responses_computed=12, responses_reused=8, scores_computed=20))
    rescore = (await client.rescore(source)).job_id
    job = assert_json(await web.get(f"/api/jobs/{source}"))["job"]
    assert job["result"]["work"] == {
        "responses_computed": 12,
        "responses_resumed": 0,
        "responses_reused": 8,
        "scores_computed": 20,
        "scores_reused": 0,
    }
    assert job["request"]["rescore_of"] is None
    job = assert_json(await web.get(f"/api/jobs/{rescore[:8]}"))["job"]
    assert job["request"]["rescore_of"] == source and job["result"] is None


async def test_artifacts_download_as_sandboxed_attachments(web: httpx.AsyncClient, nc: Any, topology: Topology) -> None:
    job_id = str(uuid.uuid4())
    page = b"<html><script>alert(document.cookie)</script></html>"
    store = await nc.jetstream().object_store(topology.results_bucket)
    await store.put(f"{job_id}/results.json", page)
    await store.put(f"{job_id}/samples/odd name<x>.html", page)
    for name, filename in (("results.json", "results.json"), ("samples/odd name<x>.html", "odd_name_x_.html")):
        download = await web.get(f"/api/jobs/{job_id}/files/{name}")
        assert download.status_code == 200, name
        assert download.headers["content-type"] == "application/octet-stream"
        assert download.headers["content-disposition"] == f'attachment; filename="{filename}"'
        assert download.headers["content-security-policy"] == ARTIFACT_CSP
        assert download.headers["x-content-type-options"] == "nosniff"
        assert download.headers["content-length"] == str(len(page))
        assert download.content == page
    assert_json(await web.get(f"/api/jobs/{job_id}/files/eval.log"), 404)
    # Another job's file is not reached by climbing out of this one's folder.
    other = str(uuid.uuid4())
    await store.put(f"{other}/results.json", b"{}")
    assert_json(await web.get(f"/api/jobs/{job_id}/files/..%2F{other}%2Fresults.json"), 404)


async def test_cancel_is_refused_when_read_only_and_without_the_dashboards_header(
    dashboard: Callable[..., httpx.AsyncClient], client: AsyncClient
) -> None:
    accepted = await client.submit(**JOB)
    cancel = f"/api/jobs/{accepted.job_id}/cancel"
    read_only = dashboard()
    assert assert_json(await read_only.get(f"/api/jobs/{accepted.job_id}"))["allow_cancel"] is False
    assert assert_json(await read_only.get("/api/queue"))["allow_cancel"] is False
    # Read-only, the route does not exist, whatever the request carries.
    assert (await read_only.post(cancel, headers=DASHBOARD)).status_code == 404
    assert (await read_only.post(cancel)).status_code == 404
    assert (await client.get_job(accepted.job_id)).status == "queued"

    allowed = dashboard(ui_allow_cancel=True)
    assert assert_json(await allowed.get(f"/api/jobs/{accepted.job_id}"))["allow_cancel"] is True
    # What a cross-site form can send: no header, or not the dashboard's value.
    # A form's content type is refused before the header is looked at (415, webguard.py).
    form = {"Content-Type": "application/x-www-form-urlencoded", "X-Evalq-Ui": "1"}
    refused = assert_json(await allowed.post(cancel, headers=form), 415)
    assert "application/json" in refused["detail"]
    for headers in ({}, {"X-Evalq-Ui": "0"}):
        refused = assert_json(await allowed.post(cancel, headers=headers), 403)
        assert "X-Evalq-Ui" in refused["detail"]
    assert (await allowed.get(cancel)).status_code == 405
    assert (await client.get_job(accepted.job_id)).status == "queued"
    reply = assert_json(await allowed.post(cancel, headers=DASHBOARD))
    assert reply["job_id"] == accepted.job_id and reply["status"] == "cancelled"
    assert (await client.get_job(accepted.job_id)).status == "cancelled"
    # Its page no longer offers a cancel, and a second one is refused as the job's state says.
    assert assert_json(await allowed.get(f"/api/jobs/{accepted.job_id}"))["allow_cancel"] is False
    assert_json(await allowed.post(cancel, headers=DASHBOARD), 409)


async def test_unknown_job_ids_answer_404(dashboard: Callable[..., httpx.AsyncClient]) -> None:
    web = dashboard(ui_allow_cancel=True)
    unknown = str(uuid.uuid4())
    for given in (unknown, unknown[:8], "not-hex!"):
        for path in (
            f"/api/jobs/{given}",
            f"/api/jobs/{given}/samples",
            f"/api/jobs/{given}/log",
            f"/api/jobs/{given}/files/results.json",
        ):
            assert "detail" in assert_json(await web.get(path), 404), path
        assert "detail" in assert_json(await web.get("/api/compare", params={"jobs": given}), 404), given
        assert "detail" in assert_json(await web.get("/api/stream", params={"job": given}), 404), given
        assert "detail" in assert_json(await web.post(f"/api/jobs/{given}/cancel", headers=DASHBOARD), 404), given


async def test_a_checkpoints_job_carries_its_turnaround(
    web: httpx.AsyncClient, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    job = await checkpoint_job(client, nc, topology)
    answer = assert_json(await web.get(f"/api/jobs/{job}"))
    assert answer["turnaround"] == TURNAROUND
    other = (await client.submit(**JOB)).job_id
    assert assert_json(await web.get(f"/api/jobs/{other}"))["turnaround"] is None


async def queued_of_team(nc: Any, topology: Topology, team: str, priority: str = "normal", **extra: Any) -> str:
    """A waiting job of another team, as the gateway leaves it: its record in the jobs bucket
    (where there are no accounts every submission is team `default`). Returns its id."""
    from evalq.schemas import now

    job_id = str(uuid.uuid4())
    record = {
        "job_id": job_id,
        "status": "queued",
        "created_at": now(),
        "request": {**JOB, "priority": priority},
        "pool": "default",
        "team": team,
        **extra,
    }
    await (await nc.jetstream().key_value(topology.jobs_bucket)).create(job_id, json.dumps(record).encode())
    return job_id


async def test_the_queue_comes_in_the_schedulers_order_and_teams_with_their_use(
    web: httpx.AsyncClient, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    normal = (await client.submit(**JOB)).job_id
    low = (await client.submit(**JOB, priority="low")).job_id
    urgent = (await client.submit(**JOB, priority="urgent")).job_id
    other = await queued_of_team(nc, topology, "alpha", "high")

    async def rows() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = assert_json(await web.get("/api/queue"))["queue"]["queue"].get("default", [])
        return found

    found = await eventually(
        rows, timeout=10, until=lambda r: len(r) == 4, what="the four waiting jobs in the queue's rows"
    )
    # No worker: nothing is admitted, and the rows are the scheduler's order, priority first.
    assert [(r["position"], r["job_id"], r["team"], r["priority"]) for r in found] == [
        (0, urgent, "default", "urgent"),
        (1, other, "alpha", "high"),
        (2, normal, "default", "normal"),
        (3, low, "default", "low"),
    ]
    assert found[0]["waiting"] is None  # the first waits only for a worker
    assert [r["waiting"] for r in found[1:]] == ["behind higher priority"] * 3
    assert found == msgspec.to_builtins((await client.queue()).queue["default"])

    teams = assert_json(await web.get("/api/teams"))["teams"]
    by_team = {(t["pool"], t["team"]): t for t in teams}
    assert set(by_team) == {("default", "default"), ("default", "alpha")}
    assert by_team["default", "default"]["queued"] == 3 and by_team["default", "alpha"]["queued"] == 1
    assert by_team["default", "alpha"] == {
        "team": "alpha",
        "pool": "default",
        "share": 1.0,
        "use_gpu_s": 0.0,
        "running_gpus": 0,
        "queued": 1,
        "max_running_gpus": None,
        "max_queued": None,
        "max_priority": "urgent",
    }
    # The history route filters by team, and its summaries say each job's team and priority.
    listed = assert_json(await web.get("/api/jobs", params={"team": "alpha"}))["jobs"]
    assert [(j["job_id"], j["team"], j["priority"]) for j in listed] == [(other, "alpha", "high")]
    job = assert_json(await web.get(f"/api/jobs/{low}"))["job"]
    assert job["request"]["priority"] == "low" and job["waiting"] == "behind higher priority"
    assert job["preemptions"] == 0


# --- the history's pages, verdicts and per-sample flips ------------------------------------

FLIP_TASK = "flip_task"


def sample_rows(right: set[int], docs: Iterable[int], who: str) -> list[dict[str, Any]]:
    """lmms-eval's logged samples of `FLIP_TASK`: `exact_match` 1 for the documents in `right`."""
    return [
        {
            "doc_id": d,
            "input": f"question {d}",
            "target": f"answer {d}",
            "filtered_resps": [f"{who} says {d}"],
            "exact_match": 1.0 if d in right else 0.0,
            "score": 0.5,
        }
        for d in docs
    ]


async def completed_with_samples(
    client: AsyncClient, nc: Any, topology: Topology, rows: list[dict[str, Any]], **fields: Any
) -> str:
    """A job completed by hand, its samples file in the results store and listed in its record."""
    from evalq.jobstore import JobStore
    from evalq.schemas import JobResult, now

    job_id = (await client.submit(**{**JOB, **fields})).job_id
    name = f"{job_id}/samples/19700101_000000_samples_{FLIP_TASK}.jsonl"
    store = await nc.jetstream().object_store(topology.results_bucket)
    await store.put(name, "".join(json.dumps(row) + "\n" for row in rows).encode())
    right = sum(row["exact_match"] for row in rows) / len(rows)
    result = JobResult(metrics={FLIP_TASK: {"exact_match,none": right, "score,none": 0.5}}, artifacts=[name])
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    await jobs.transition(
        job_id, lambda info: msgspec.structs.replace(info, status="completed", completed_at=now(), result=result)
    )
    return job_id


async def test_flips_pair_two_jobs_documents_with_both_outputs_and_mcnemars_p(
    web: httpx.AsyncClient, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    from scipy import stats as scipy_stats

    # Both jobs scored 0-9; only `a` scored 10 and 11, only `b` 12: those are not pairs.
    a = await completed_with_samples(client, nc, topology, sample_rows({0, 1, 2, 3, 4, 5, 11}, range(12), "A"))
    rows_b = sample_rows({0, 1, 6, 7, 8, 12}, [*range(10), 12], "B")
    rows_b[7]["filtered_resps"] = [XSS]
    b = await completed_with_samples(client, nc, topology, rows_b)
    query = {"a": a[:8], "b": b, "task": FLIP_TASK, "metric": "exact_match"}
    answer = assert_json(await web.get("/api/compare/flips", params=query))
    assert (answer["a"], answer["b"], answer["task"], answer["metric"]) == (a, b, FLIP_TASK, "exact_match")
    counts = ("pairs", "both_right", "both_wrong", "right_to_wrong", "wrong_to_right", "truncated")
    assert [answer[k] for k in counts] == [10, 2, 1, 4, 3, False]
    assert answer["p_value"] == pytest.approx(scipy_stats.binomtest(3, 7, 0.5).pvalue, rel=1e-12)
    assert [f["doc_id"] for f in answer["lost"]] == [2, 3, 4, 5]
    assert [f["doc_id"] for f in answer["gained"]] == [6, 7, 8]
    assert answer["lost"][0] == {
        "doc_id": 2,
        "input": "question 2",
        "images": [],
        "target": "answer 2",
        "output_a": "A says 2",
        "output_b": "B says 2",
    }
    assert answer["gained"][1]["output_b"] == XSS  # the model's text, as a JSON string
    # lmms-eval's results key names the same metric; the other way round, the flips swap.
    swapped = assert_json(
        await web.get("/api/compare/flips", params={**query, "a": b, "b": a, "metric": "exact_match,none"})
    )
    assert [f["doc_id"] for f in swapped["lost"]] == [6, 7, 8] and swapped["p_value"] == answer["p_value"]
    assert swapped["lost"][0]["output_a"] == "B says 6"
    few = assert_json(await web.get("/api/compare/flips", params={**query, "limit": 1}))
    assert [len(few["lost"]), len(few["gained"]), few["right_to_wrong"], few["truncated"]] == [1, 1, 4, True]


async def test_flips_refuse_bad_input_with_a_4xx(
    web: httpx.AsyncClient, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    a = await completed_with_samples(client, nc, topology, sample_rows({1}, range(4), "A"))
    b = await completed_with_samples(client, nc, topology, sample_rows({2}, range(4), "B"))
    queued = (await client.submit(**JOB)).job_id
    good = {"a": a, "b": b, "task": FLIP_TASK, "metric": "exact_match"}
    refused = [
        ({"a": a, "task": FLIP_TASK, "metric": "exact_match"}, 400, "missing b"),
        ({**good, "metric": " "}, 400, "missing metric"),
        ({**good, "limit": "0"}, 400, "`limit` must be between"),
        ({**good, "limit": "many"}, 400, "`limit` must be an integer"),
        ({**good, "b": str(uuid.uuid4())}, 404, "no job"),
        ({**good, "b": "not-hex!"}, 404, "not a job id"),
        ({**good, "b": queued}, 404, "logged no samples of task"),
        ({**good, "task": "other"}, 404, "logged no samples of task 'other'"),
        ({**good, "metric": "score"}, 422, "not a 0/1 score"),
        ({**good, "metric": "absent"}, 422, "carries a `absent` score"),
    ]
    for params, status, words in refused:
        answer = assert_json(await web.get("/api/compare/flips", params=params), status)
        assert words in answer["detail"], (params, answer)


async def test_history_pages_filter_and_carry_verdicts(
    web: httpx.AsyncClient, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    from evalq.jobstore import JobStore
    from evalq.schemas import JobResult, RuleOutcome, Verdict, now

    batch = {"batch": uuid.uuid4().hex}
    ids = [(await client.submit(**JOB, labels=batch)).job_id for _ in range(5)]
    await client.gates.set("release", {"rules": [{"metric": "evalq_demo/exact_match", "max_drop": 0.02}]})
    gated = (await client.submit(**JOB, labels=batch, gate="release")).job_id
    rule = RuleOutcome(metric="evalq_demo/exact_match,none", tier="critical", status="BREACH", value=0.1)
    verdict = Verdict(verdict="NO-GO", policy="release", baseline=ids[0], rules=[rule], at=now())
    result = JobResult(metrics={"evalq_demo": {"exact_match,none": 0.1}})
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    # Completed and judged in one write: no gatekeeper judges it in between.
    await jobs.transition(
        gated,
        lambda info: msgspec.structs.replace(
            info, status="completed", completed_at=now(), result=result, verdict=verdict
        ),
    )
    for job_id in ids[:2]:
        await mark_completed(nc, topology, job_id)
    await client.cancel_job(ids[2])
    newest_first = [gated, *reversed(ids)]
    label = f"batch={batch['batch']}"

    async def every(**params: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = assert_json(
                await web.get(
                    "/api/history",
                    params={"label": label, "limit": 2, **params, **({"cursor": cursor} if cursor else {})},
                )
            )
            assert len(page["jobs"]) <= 2
            found += page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                return found

    listed = await eventually(
        every,
        timeout=10,
        until=lambda found: [j["status"] for j in found][:1] == ["completed"] and len(found) == 6,
        what="the six jobs in the history, the gated one completed",
    )
    assert [j["job_id"] for j in listed] == newest_first
    assert (listed[0]["gate"], listed[0]["verdict"]) == ("release", "NO-GO")
    assert all(j["verdict"] is None and j["gate"] is None for j in listed[1:])
    finished = await eventually(
        lambda: every(status="completed,failed,cancelled"),
        timeout=10,
        until=lambda found: len(found) == 4,
        what="the four finished jobs",
    )
    assert [j["job_id"] for j in finished] == [gated, ids[2], ids[1], ids[0]]
    assert [j["job_id"] for j in await every(status=["cancelled"])] == [ids[2]]
    # `created_after` is inclusive, `created_before` exclusive.
    created = {j["job_id"]: j["created_at"] for j in listed}
    after = await every(created_after=created[ids[3]])
    assert [j["job_id"] for j in after] == [gated, ids[4], ids[3]]
    before = await every(created_before=created[ids[3]])
    assert [j["job_id"] for j in before] == [ids[2], ids[1], ids[0]]
    # The trends and compare pages get the verdict too.
    trends = assert_json(await web.get("/api/jobs", params={"label": label, "status": "completed"}))["jobs"]
    assert {j["job_id"]: j["verdict"] for j in trends} == {gated: "NO-GO", ids[1]: None, ids[0]: None}
    compared = assert_json(await web.get("/api/compare", params={"jobs": f"{gated},{ids[4]}"}))["jobs"]
    assert [(j["gate"], j["verdict"]) for j in compared] == [("release", "NO-GO"), (None, None)]
    job = assert_json(await web.get(f"/api/jobs/{gated}"))["job"]
    assert job["verdict"]["verdict"] == "NO-GO" and job["verdict"]["rules"][0]["status"] == "BREACH"


async def test_history_refuses_bad_filters_with_a_4xx(web: httpx.AsyncClient) -> None:
    refused = [
        ({"status": "done"}, 400, "`status` must be one of"),
        ({"status": "completed,nope"}, 400, "'nope'"),
        ({"label": "novalue"}, 400, "`label` must be k=v"),
        ({"label": "=v"}, 400, "`label` must be k=v"),
        ({"created_after": "yesterday"}, 400, "`created_after` must be an RFC 3339 time"),
        ({"created_before": "2026-01-31T12:00:00"}, 400, "with its zone"),
        ({"limit": "0"}, 400, "`limit` must be between 1 and 1000"),
        ({"limit": "1001"}, 400, "`limit` must be between 1 and 1000"),
    ]
    for params, status, words in refused:
        answer = assert_json(await web.get("/api/history", params=params), status)
        assert words in answer["detail"], (params, answer)
    # A cursor the gateway never gave: its own refusal, a 4xx, never a traceback.
    bad_cursor = await web.get("/api/history", params={"cursor": "not-a-cursor"})
    assert 400 <= bad_cursor.status_code < 500, bad_cursor.text
    assert "detail" in assert_json(bad_cursor, bad_cursor.status_code)
