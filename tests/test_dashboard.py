"""The dashboard in a real browser: Debian's chromium (`make browser`) driven by Playwright.

Each test runs a gateway, the web process and, where jobs must end, a worker with the
stand-in evaluator, all on this test's own prefix, and a headless chromium against the web
process's loopback port. A screenshot of each page is kept under `$EVALQ_ARTIFACTS` (or the
test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.schemas import Work, encode
from evalq.topology import Topology
from evalq.web import WebServer

from .checkpoint_job import LOGGED, NOT_LOGGED, checkpoint_job, track
from .jobs import FAKE, mark_completed
from .test_dashboard_routes import queued_of_team
from .waiting import eventually

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or async_playwright is None,
    reason="needs Debian's chromium (`make browser` installs it) and playwright (the dev extra)",
)

TASK = "fake"
XSS = "<img src=x onerror=alert(1)>"


def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("EVALQ_ARTIFACTS") or tmp_path) / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def web(settings: Settings, client: AsyncClient) -> AsyncIterator[str]:
    async with WebServer(settings.with_(ui_port=0), client) as server:
        yield server.url


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


async def open_page(browser: Browser, url: str, dialogs: list[str] | None = None) -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    if dialogs is not None:

        async def on_dialog(dialog: Any) -> None:
            dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", on_dialog)
    await page.goto(url)
    await page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return page


async def completed_jobs(client: AsyncClient, worker_factory: Any, jobs: list[dict[str, Any]]) -> list[str]:
    await worker_factory(evaluator=FAKE)
    ids = [(await client.submit(model="dummy", tasks=[TASK], limit=2, **fields)).job_id for fields in jobs]
    for job_id in ids:
        await client.wait_for_job(job_id, timeout=60)
    return ids


async def test_queue_page_shows_a_new_job_within_a_second(
    web: str, browser: Browser, client: AsyncClient, tmp_path: Path
) -> None:
    page = await open_page(browser, web + "/")
    await page.wait_for_selector("#live.on", timeout=10_000)  # the event stream is open
    assert await page.locator("#queued-table").count() == 0
    accepted = await client.submit(model="dummy", tasks=[TASK], labels={"run": "live"})
    started = time.monotonic()
    row = f"#queued-table tr[data-job='{accepted.job_id}']"
    await page.wait_for_selector(row, timeout=1000)
    assert time.monotonic() - started < 1.0
    # The short id links to the job's page, and the page was not reloaded to show it.
    link = page.locator(f"{row} a.jobid")
    assert await link.text_content() == accepted.job_id[:8]
    assert await link.get_attribute("href") == f"/jobs/{accepted.job_id}"
    assert await page.locator(f"{row} .label").text_content() == "run=live"
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "queue.png"), full_page=True)


async def test_job_page_shows_metrics_when_it_completes(
    web: str, browser: Browser, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    accepted = await client.submit(
        model="dummy", tasks=[TASK], limit=3, model_args="score=0.75,stderr=0.05,samples=12", labels={"step": "10"}
    )
    page = await open_page(browser, f"{web}/jobs/{accepted.job_id}")
    assert await page.locator("#job-status").text_content() == "queued"
    await page.wait_for_selector("#live.on", timeout=10_000)
    await worker_factory(evaluator=FAKE)
    # Everything below arrives through the page's event stream, with no reload.
    metric = page.locator(f"#metrics-table tr[data-metric='{TASK}/exact_match']")
    await metric.wait_for(timeout=60_000)
    assert await metric.locator("td").all_text_contents() == [TASK, "exact_match", "0.7500", "± 0.0500"]
    await page.wait_for_selector("#job-status.status-completed", timeout=10_000)
    types = await page.locator("#timeline li").evaluate_all("items => items.map(i => i.dataset.type)")
    assert types[0] == "queued" and "started" in types and types[-1] == "completed", types
    await page.wait_for_selector("#samples .sample", timeout=10_000)
    assert await page.locator("#samples-range").text_content() == "1-10 of 12"
    first = page.locator("#samples .sample").first
    assert "question 0" in (await first.text_content() or "")
    assert await first.locator("img").get_attribute("src") == _tiny_png()
    await page.click("#samples-next")
    await page.wait_for_selector("#samples .sample[data-doc='11']", timeout=5_000)
    assert "answer 11" in (await page.locator("#samples .sample").last.text_content() or "")
    log_text = await page.locator("#log").text_content()
    assert log_text and "fake evaluator pid" in log_text
    # Artifacts download through the web process.
    link = page.locator("#artifacts a", has_text="results.json")
    async with page.expect_download() as download_info:
        await link.click()
    download = await download_info.value
    assert "exact_match" in Path(await download.path()).read_text()
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "job.png"), full_page=True)


async def test_job_page_shows_its_work_and_links_the_job_it_rescores(
    web: str, browser: Browser, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    source = (await client.submit(model="dummy", tasks=[TASK])).job_id
    await mark_completed(nc, topology, source, Work(responses_computed=120, responses_resumed=380, scores_computed=500))
    rescore = (await client.rescore(source)).job_id
    page = await open_page(browser, f"{web}/jobs/{source}")
    assert await page.locator("#job-work").text_content() == (
        "responses 120 computed, 380 resumed, 0 reused; scores 500 computed, 0 reused"
    )
    assert await page.locator("#job-rescore-of").count() == 0
    page = await open_page(browser, f"{web}/jobs/{rescore}")
    link = page.locator("#job-rescore-of a.jobid")
    assert await link.text_content() == source[:8]
    assert await link.get_attribute("href") == f"/jobs/{source}"
    assert await page.locator("#job-work").count() == 0  # not run yet


async def test_job_page_shows_a_checkpoints_turnaround_and_its_logging_live(
    web: str, browser: Browser, client: AsyncClient, nc: Any, topology: Topology, tmp_path: Path
) -> None:
    job = await checkpoint_job(client, nc, topology, logged=False)
    page = await open_page(browser, f"{web}/jobs/{job}")
    assert await page.locator("#job-turnaround").text_content() == NOT_LOGGED
    await page.wait_for_selector("#live.on", timeout=10_000)
    # `evalq track` logs it: the page shows it through its event stream, with no reload.
    await nc.jetstream().publish(topology.event_subject(job, "tracked", team="default"), encode(track(job)))
    tracked = page.locator("#timeline li[data-type='tracked']")
    await tracked.wait_for(timeout=10_000)
    assert "logged to tensorboard" in (await tracked.text_content() or "")
    await page.wait_for_function(
        "line => document.querySelector('#job-turnaround').textContent === line", arg=LOGGED, timeout=10_000
    )
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "turnaround.png"), full_page=True)
    # A job with no save time has no such row.
    other = (await client.submit(model="dummy", tasks=[TASK])).job_id
    page = await open_page(browser, f"{web}/jobs/{other}")
    assert await page.locator("#job-turnaround").count() == 0


def _tiny_png() -> str:
    from . import fake_evaluator

    return fake_evaluator.TINY_PNG


async def test_trends_page_plots_three_steps(
    web: str, browser: Browser, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    steps = {"100": 0.5, "200": 0.6, "300": 0.7}
    ids = await completed_jobs(
        client,
        worker_factory,
        [{"labels": {"step": s, "run": "a"}, "model_args": f"score={v},stderr=0.02"} for s, v in steps.items()],
    )
    page = await open_page(browser, f"{web}/trends?x=step&group=run&metric={TASK}/exact_match")
    points = page.locator("svg.chart circle.point")
    assert await points.count() == 3
    assert sorted(await points.evaluate_all("cs => cs.map(c => c.dataset.job)")) == sorted(ids)
    ys = await points.evaluate_all("cs => cs.map(c => Number(c.getAttribute('cy')))")
    assert ys[0] > ys[1] > ys[2]  # a rising score is drawn higher at each step (SVG y grows downwards)
    assert await page.locator("svg.chart g.series[data-series='a'] polygon.band").count() == 1
    assert await page.locator("#chart-note").text_content() == "3 points from 3 completed jobs"
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "trends.png"), full_page=True)
    await points.nth(1).click()
    await page.wait_for_url(f"{web}/jobs/{ids[1]}")


async def test_a_label_with_markup_is_shown_as_text(
    web: str, browser: Browser, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    dialogs: list[str] = []
    queue = await open_page(browser, web + "/", dialogs)
    await queue.wait_for_selector("#live.on", timeout=10_000)
    queued = await client.submit(model="dummy", tasks=[TASK], labels={"note": XSS, "step": "1"})
    chip = queue.locator("#queued-table .label", has_text="note=")
    await chip.wait_for(timeout=5_000)
    assert await chip.text_content() == f"note={XSS}"
    job = await open_page(browser, f"{web}/jobs/{queued.job_id}", dialogs)
    assert await job.locator("#job-head .label", has_text="note=").text_content() == f"note={XSS}"
    [done] = await completed_jobs(client, worker_factory, [{"labels": {"run": XSS, "step": "5"}}])
    trends = await open_page(browser, f"{web}/trends?x=step&group=run&metric={TASK}/exact_match", dialogs)
    assert await trends.locator(".legend span", has_text="<img").text_content() == XSS
    compare = await open_page(browser, f"{web}/compare?jobs={done},{queued.job_id}", dialogs)
    assert await compare.locator("#compare-table .label", has_text="run=").text_content() == f"run={XSS}"
    for page in (queue, job, trends, compare):
        # No element came from the label: the only images are none at all.
        assert await page.locator("img").count() == 0
    assert dialogs == []
    await job.screenshot(path=str(artifacts_dir(tmp_path) / "xss.png"), full_page=True)


async def test_compare_page_shows_deltas(
    web: str, browser: Browser, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    first, second, third = await completed_jobs(
        client,
        worker_factory,
        [{"model_args": "score=0.5"}, {"model_args": "score=0.75"}, {"model_args": "score=0.25"}],
    )
    # Short ids are accepted where the gateway resolves them; the full ids always are.
    page = await open_page(browser, f"{web}/compare?jobs={first},{second},{third}")
    row = page.locator(f"#compare-table tr[data-metric='{TASK}/exact_match'] td")
    assert await row.all_text_contents() == [f"{TASK}/exact_match", "0.5000", "0.7500", "+0.2500", "0.2500", "-0.2500"]
    assert await page.locator("#compare-table th a.jobid").all_text_contents() == [first[:8], second[:8], third[:8]]
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "compare.png"), full_page=True)


async def test_read_only_unless_cancel_is_allowed(settings: Settings, client: AsyncClient) -> None:
    """No browser needed: the routes themselves (skipped with the others where chromium is absent)."""
    import httpx

    accepted = await client.submit(model="dummy", tasks=[TASK])
    cancel = f"/api/jobs/{accepted.job_id}/cancel"
    async with WebServer(settings.with_(ui_port=0), client) as server, httpx.AsyncClient(base_url=server.url) as http:
        page = await http.get(f"/jobs/{accepted.job_id}", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert (await http.get("/")).json()["service"] == "evalq"  # a script still gets the JSON index
        assert (await http.post(cancel, headers={"X-Evalq-Ui": "1"})).status_code in (404, 405)
        assert (await http.get("/api/jobs/not-hex!")).status_code == 404
    allowed = settings.with_(ui_port=0, ui_allow_cancel=True)
    async with WebServer(allowed, client) as server, httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get(f"/api/jobs/{accepted.job_id}")).json()["allow_cancel"] is True
        # A cross-site form cannot add the header: refused.
        assert (await http.post(cancel)).status_code == 403
        assert (await client.get_job(accepted.job_id)).status == "queued"
        reply = await http.post(cancel, headers={"X-Evalq-Ui": "1"})
        assert reply.status_code == 200 and reply.json()["status"] == "cancelled"


async def test_the_cancel_button_works_from_each_name_of_a_loopback_bind(
    settings: Settings, browser: Browser, client: AsyncClient
) -> None:
    """The cross-site check lets the dashboard's own pages through, whichever loopback name they were opened on."""
    async with WebServer(settings.with_(ui_port=0, ui_allow_cancel=True), client) as server:
        port = server.url.rsplit(":", 1)[1]
        for base in (server.url, f"http://localhost:{port}"):
            accepted = await client.submit(model="dummy", tasks=[TASK])
            page = await open_page(browser, f"{base}/jobs/{accepted.job_id}")
            await page.wait_for_selector("#live.on", timeout=10_000)
            async with page.expect_response(lambda r: r.url.endswith("/cancel")) as answer:
                await page.click("#cancel")
            assert (await answer.value).status == 200, base
            await page.wait_for_selector("#job-status.status-cancelled", timeout=10_000)
            assert (await client.get_job(accepted.job_id)).status == "cancelled"


# The classic JSON form: a text/plain form whose one field's name and value, joined by `=`, are
# a JSON body. Any page can send it to any port on the visitor's machine.
EVIL_FORM = """<!doctype html><form method="post" enctype="text/plain" action="{action}">
<input name='{{"model": "dummy", "tasks": ["fake"], "labels": {{"x": "' value='"}}}}'></form>
<script>document.forms[0].submit()</script>"""


async def test_a_form_on_another_site_queues_nothing(settings: Settings, browser: Browser, client: AsyncClient) -> None:
    async with WebServer(settings.with_(ui_port=0, lmms_eval_api=True), client) as server:
        page = await browser.new_page()
        html = EVIL_FORM.format(action=f"{server.url}/evaluate")
        await page.route("http://evil.example/**", lambda route: route.fulfill(body=html, content_type="text/html"))
        async with page.expect_response(f"{server.url}/evaluate") as answer:
            await page.goto("http://evil.example/")
        reply = await answer.value
        assert reply.request.headers["content-type"] == "text/plain"  # what the browser sent
        assert reply.status == 403, await reply.text()
        assert (await client.queue()).queue_size == 0


async def test_queue_page_shows_the_schedulers_order_and_filters_by_team(
    web: str, browser: Browser, client: AsyncClient, nc: Any, topology: Topology, tmp_path: Path
) -> None:
    normal = (await client.submit(model="dummy", tasks=[TASK])).job_id
    low = (await client.submit(model="dummy", tasks=[TASK], priority="low")).job_id
    other = await queued_of_team(nc, topology, "alpha", "high", preemptions=2)
    await eventually(client.queue, timeout=10, until=lambda q: len(q.queue.get("default", [])) == 3, what="3 rows")
    page = await open_page(browser, web + "/")
    await page.wait_for_selector("#live.on", timeout=10_000)
    cells = "rows => rows.map(r => [...r.cells].slice(0, 6).map(c => c.textContent))"
    rows = page.locator("#queued-table tbody tr")
    assert await rows.evaluate_all(cells) == [
        ["0", other[:8], "default", "alpha", "high", "for a free worker"],
        ["1", normal[:8], "default", "default", "normal", "behind higher priority"],
        ["2", low[:8], "default", "default", "low", "behind higher priority"],
    ]
    # A job submitted now shows at once, and goes to the head once the page takes the order again.
    urgent = (await client.submit(model="dummy", tasks=[TASK], priority="urgent")).job_id
    await page.wait_for_function(
        "id => { const r = document.querySelector('#queued-table tbody tr');"
        " return r && r.dataset.job === id && r.cells[0].textContent === '0' && r.cells[4].textContent === 'urgent'; }",
        arg=urgent,
        timeout=10_000,
    )
    assert await rows.evaluate_all("rows => rows.map(r => r.dataset.job)") == [urgent, other, normal, low]
    teams = page.locator("#teams-table tbody tr")
    await page.wait_for_function(
        "() => document.querySelector(\"#teams-table tr[data-team='default'] td:nth-child(6)\")?.textContent === '3'",
        timeout=10_000,
    )
    assert await teams.evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.textContent))") == [
        ["default", "alpha", "1", "0.0", "0", "1", "urgent"],
        ["default", "default", "1", "0.0", "0", "3", "urgent"],
    ]
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "queue-order.png"), full_page=True)
    # The team filter: only that team's rows, here and in the teams card, kept in the URL.
    await page.select_option("#team-filter", "alpha")
    await page.wait_for_function("() => document.querySelectorAll('#queued-table tbody tr').length === 1")
    assert await rows.evaluate_all("rows => rows.map(r => r.dataset.job)") == [other]
    assert await teams.evaluate_all("rows => rows.map(r => r.dataset.team)") == ["alpha"]
    assert page.url == f"{web}/?team=alpha"
    again = await open_page(browser, f"{web}/?team=default")
    assert await again.locator("#team-filter").input_value() == "default"
    mine = again.locator("#queued-table tbody tr")
    assert await mine.evaluate_all("rows => rows.map(r => r.dataset.job)") == [urgent, normal, low]
    # The job page: its priority, why it waits, and how often a higher priority took its worker.
    job = await open_page(browser, f"{web}/jobs/{low}")
    assert await job.locator("#job-priority").text_content() == "low"
    assert await job.locator("#job-waiting").text_content() == "behind higher priority"
    assert await job.locator("#job-preemptions").count() == 0
    job = await open_page(browser, f"{web}/jobs/{other}")
    assert await job.locator("#job-priority").text_content() == "high"
    assert await job.locator("#job-preemptions").text_content() == "2 times: a higher priority took its worker"


async def test_trends_page_filters_by_team(
    web: str, browser: Browser, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    mine = (await client.submit(model="dummy", tasks=[TASK], labels={"step": "1"})).job_id
    theirs = await queued_of_team(nc, topology, "alpha", labels={"step": "2"})
    for job_id in (mine, theirs):
        await mark_completed(nc, topology, job_id)
    base = f"{web}/trends?x=step&group=&metric=evalq_demo/exact_match,none"
    points = "cs => cs.map(c => c.dataset.job)"
    page = await open_page(browser, base)
    assert sorted(await page.locator("svg.chart circle.point").evaluate_all(points)) == sorted([mine, theirs])
    page = await open_page(browser, base + "&team=alpha")
    assert await page.locator("svg.chart circle.point").evaluate_all(points) == [theirs]
    assert await page.locator("#trend-team").input_value() == "alpha"
    await page.fill("#trend-team", "default")
    await page.press("#trend-team", "Enter")
    await page.wait_for_url("**team=default**")
    await page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    assert await page.locator("svg.chart circle.point").evaluate_all(points) == [mine]


# --- the history, verdicts and per-sample flips ---------------------------------------------


async def test_jobs_page_filters_and_pages(
    web: str, browser: Browser, client: AsyncClient, nc: Any, topology: Topology, tmp_path: Path
) -> None:
    batch = f"batch={uuid.uuid4().hex[:12]}"
    key, value = batch.split("=")
    ids = [(await client.submit(model="dummy", tasks=[TASK], labels={key: value})).job_id for _ in range(5)]
    for job_id in ids[:2]:
        await mark_completed(nc, topology, job_id)
    await client.cancel_job(ids[2])
    newest_first = list(reversed(ids))
    await eventually(
        lambda: client.jobs(labels={key: value}, status="completed"),
        timeout=10,
        until=lambda page: len(page.jobs) == 2,
        what="both completed jobs in the history",
    )
    # From the navigation, then the filters and pages in the URL's query.
    front = await open_page(browser, web + "/")
    await front.click("nav a[href='/jobs']")
    await front.wait_for_url(f"{web}/jobs")
    page = await open_page(browser, f"{web}/jobs?label={batch}&limit=2")
    shown = "rows => rows.map(r => r.dataset.job)"
    rows = page.locator("#jobs-table tbody tr")
    assert await rows.evaluate_all(shown) == newest_first[:2]
    assert await page.locator("#jobs-previous").is_disabled()
    await page.click("#jobs-next")
    await page.wait_for_function("() => document.querySelector('#jobs-page').textContent === 'page 2'", timeout=10_000)
    assert await rows.evaluate_all(shown) == newest_first[2:4]
    assert await rows.nth(0).locator("td").nth(1).text_content() == "cancelled"
    await page.click("#jobs-next")
    await page.wait_for_function("() => document.querySelector('#jobs-page').textContent === 'page 3'", timeout=10_000)
    assert await rows.evaluate_all(shown) == newest_first[4:]
    assert await page.locator("#jobs-next").is_disabled()
    await page.click("#jobs-previous")
    await page.wait_for_function("() => document.querySelector('#jobs-page').textContent === 'page 2'", timeout=10_000)
    assert await rows.evaluate_all(shown) == newest_first[2:4]
    # A status filter from the form: the page is opened anew with it.
    await page.select_option("#jobs-status", "completed")
    await page.click("#jobs-apply")
    await page.wait_for_url("**/jobs?status=completed**")
    await page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    assert await rows.evaluate_all(shown) == [ids[1], ids[0]]
    assert await page.locator("#jobs-labels").input_value() == batch
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "jobs.png"), full_page=True)
    # A filter the history refuses is said on the page.
    page = await open_page(browser, f"{web}/jobs?label=novalue")
    assert "`label` must be k=v" in (await page.locator("#jobs-error").text_content() or "")


async def test_front_page_links_jobs_that_ended_before_and_while_it_was_open(
    web: str, browser: Browser, client: AsyncClient, worker_factory: Any
) -> None:
    [before] = await completed_jobs(client, worker_factory, [{"labels": {"when": "before"}}])
    page = await open_page(browser, web + "/")
    await page.wait_for_selector("#live.on", timeout=10_000)
    await page.evaluate("window.notReloaded = true")
    row = page.locator(f"#recent-table tr[data-job='{before}']")
    assert await row.locator("td").nth(1).text_content() == "completed"
    while_open = (await client.submit(model="dummy", tasks=[TASK], limit=2, labels={"when": "open"})).job_id
    await client.wait_for_job(while_open, timeout=60)
    link = page.locator(f"#recent-table tr[data-job='{while_open}'] a.jobid")
    await link.wait_for(timeout=10_000)
    assert await page.evaluate("window.notReloaded") is True
    assert await page.locator("#recent-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.job)") == [
        while_open,
        before,
    ]
    await link.click()
    await page.wait_for_url(f"{web}/jobs/{while_open}")
    await page.wait_for_selector("#job-status.status-completed", timeout=10_000)


GATED_TASK = "evalq_shard_demo"
RELEASE = {"rules": [{"metric": f"{GATED_TASK}/exact_match", "max_drop": 0.02}], "baseline": "previous"}


@pytest.mark.slow
async def test_verdicts_show_live_and_flips_show_both_outputs(
    web: str, browser: Browser, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    """Real lmms-eval: its dummy model answering C (106 of 240 right), then A (19, none of C's)."""
    await client.gates.set("release", RELEASE)
    worker = await worker_factory()
    run = uuid.uuid4().hex[:8]

    def job(answer: str, step: int) -> dict[str, Any]:
        labels = {"run": run, "step": str(step)}
        return {"model": "dummy", "tasks": [GATED_TASK], "model_args": {"response": answer}, "labels": labels}

    first = (await client.submit(**job("C", 100), gate="release")).job_id
    await client.wait_for_job(first, timeout=300)
    assert (await client.gates.wait(first, timeout=30)).verdict == "INCONCLUSIVE"  # no earlier step

    # The front page and the next job's page are open before that job runs: no worker until then.
    await worker.stop()
    front = await open_page(browser, web + "/")
    await front.wait_for_selector("#live.on", timeout=10_000)
    worse = (await client.submit(**job("A", 200), gate="release")).job_id
    page = await open_page(browser, f"{web}/jobs/{worse}")
    await page.wait_for_selector("#live.on", timeout=10_000)
    for opened in (front, page):
        await opened.evaluate("window.notReloaded = true")
    assert "when the job completes" in (await page.locator("#gate-pending").text_content() or "")
    assert await page.locator("#job-verdict").count() == 0
    await worker_factory()
    badge = page.locator("#job-verdict[data-verdict='NO-GO']")
    await badge.wait_for(timeout=300_000)
    assert await badge.text_content() == "NO-GO"
    assert "verdict-nogo" in (await badge.get_attribute("class") or "")
    rule = page.locator("#verdict-rules tbody tr")
    cells = await rule.locator("td").all_text_contents()
    assert cells[0].startswith(f"{GATED_TASK}/exact_match") and cells[1:3] == ["critical", "BREACH"]
    p_value = await verdict_p(client, worse)
    assert cells[3:8] == ["0.0792", "0.4417", "-0.3625", "240", "mcnemar"]
    assert float(cells[8]) == pytest.approx(p_value, rel=5e-3)  # shown to 3 significant digits
    assert "beyond" in cells[9]
    assert await page.locator("#gate-verdict").text_content() == "NO-GO"
    assert await page.locator(f"#gate a.jobid[href='/jobs/{first}']").count() == 1
    assert await page.locator("#timeline li[data-type='gated']").text_content() is not None
    await page.screenshot(path=str(artifacts_dir(tmp_path) / "verdict.png"), full_page=True)
    # The front page got the ended job and then its verdict, live as well.
    await front.locator(f"#recent-table tr[data-job='{worse}'] [data-verdict='NO-GO']").wait_for(timeout=10_000)
    for opened in (front, page):
        assert await opened.evaluate("window.notReloaded") is True

    # The Jobs page's rows, the trends page's points and table carry the verdicts.
    jobs = await open_page(browser, f"{web}/jobs?label=run={run}")
    verdicts = "rows => rows.map(r => [r.dataset.job, r.querySelector('[data-verdict]')?.dataset.verdict])"
    assert await jobs.locator("#jobs-table tbody tr").evaluate_all(verdicts) == [
        [worse, "NO-GO"],
        [first, "INCONCLUSIVE"],
    ]
    trends = await open_page(browser, f"{web}/trends?x=step&group=run&metric={GATED_TASK}/exact_match&label=run={run}")
    assert await trends.locator("svg.chart circle.point").count() == 2
    assert await trends.locator("svg.chart circle.point.no-go").evaluate_all("cs => cs.map(c => c.dataset.job)") == [
        worse
    ]
    assert await trends.locator("svg.chart path.no-go-mark").count() == 1
    assert await trends.locator("#trend-verdicts tbody tr").evaluate_all(verdicts) == [
        [worse, "NO-GO"],
        [first, "INCONCLUSIVE"],
    ]
    await trends.screenshot(path=str(artifacts_dir(tmp_path) / "trends-verdicts.png"), full_page=True)

    # Compare: the documents C got right and A wrong, and the reverse, with both outputs.
    compare = await open_page(browser, f"{web}/compare?jobs={first},{worse}")
    summary = compare.locator("#flips-summary")
    await summary.wait_for(timeout=30_000)
    text = await summary.text_content() or ""
    assert (
        "240 documents scored by both: 106 right → wrong, 19 wrong → right, 0 right in both, 115 wrong in both" in text
    )
    assert float(text.rsplit("p = ", 1)[1]) == pytest.approx(p_value, rel=5e-3)  # the gate's own test
    lost = compare.locator("#flips-lost .flip")
    assert await lost.count() == 100  # the first 100 of 106
    fields = await lost.first.locator("> div").all_text_contents()
    assert fields[1:] == ["targetC", "output AC", "output BA"], fields
    gained = await compare.locator("#flips-gained .flip").first.locator("> div").all_text_contents()
    assert gained[1:] == ["targetA", "output AC", "output BA"], gained
    assert await compare.locator("#flips-gained .flip").count() == 19
    await compare.screenshot(path=str(artifacts_dir(tmp_path) / "flips.png"), full_page=True)


async def verdict_p(client: AsyncClient, job_id: str) -> float:
    info = await client.get_job(job_id)
    assert info.verdict is not None and info.verdict.rules[0].p_value is not None
    return info.verdict.rules[0].p_value
