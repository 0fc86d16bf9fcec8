"""lmms-eval's own clients against `evalq up`: the drop-in for lmms-eval's eval server.

`EvalClient` and `AsyncEvalClient` are imported from the installed lmms-eval, not copied.
One `evalq up` (embedded nats-server, gateway, a real worker, the web process with the
lmms-eval API) serves the whole module, on random loopback ports. It is started with a
token, so every client here passes it in the URL, as `http://user:TOKEN@host:port`; the
loopback-without-credentials rule is shown by a second web process (`evalq ui`) without one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lmms_eval.entrypoints.client import AsyncEvalClient, EvalClient

from evalq.config import UiSettings
from evalq.errors import ConfigError
from evalq.lmms_api import body_location
from evalq.web import check_exposure, is_loopback

from .conftest import EVALQ, REPO, Processes, run_command
from .test_embedded import free_port
from .waiting import eventually_sync

TOKEN = "s3cret-token"
DEMO = {"model": "dummy", "tasks": ["evalq_demo"]}


class Up:
    def __init__(self, proc: subprocess.Popen[bytes], nats_url: str, web_url: str, env: dict[str, str]) -> None:
        self.proc = proc
        self.nats_url = nats_url
        self.web_url = web_url  # without credentials
        self.env = env  # for `evalq` commands against this queue

    @property
    def authed(self) -> str:
        return self.web_url.replace("http://", f"http://evalq:{TOKEN}@")


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float = 90) -> re.Match[str]:

    def logged() -> re.Match[str] | None:
        found = re.search(pattern, log.read_text(errors="replace"))
        assert found or proc.poll() is None, f"exited ({proc.returncode}): {log.read_text()}"
        return found

    return eventually_sync(logged, timeout=timeout, what=lambda: f"{pattern!r} in the log: {log.read_text()}")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("up")
    env = {**os.environ, "EVALQ_HOME": str(home), "EVALQ_UI_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    log = home / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*EVALQ, "up", "--port", str(free_port()), "--ui-port", str(free_port())],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        web_url = _wait_for_line(proc, log, r"evalq ui: (http://\S+) \(lmms-eval API on\)").group(1)
        nats_url = _wait_for_line(proc, log, r"evalq up: (nats://\S+)").group(1)
        client_env = {**os.environ, "EVALQ_NATS_URL": nats_url, "EVALQ_HOME": str(home / "client")}
        yield Up(proc, nats_url, web_url, client_env)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _listed(client: EvalClient, what: str, name: str, timeout: float = 120) -> list[str]:
    """The worker lists its tasks and models once lmms-eval has indexed them: wait for `name`, bounded."""
    # The pause between tries: the inventory comes with the worker's next heartbeat.
    return eventually_sync(
        client.list_tasks if what == "tasks" else client.list_models,
        until=lambda names: name in names,
        timeout=timeout,
        what=f"{name} in /{what}",
        interval=0.2,
    )


def test_health_tasks_and_models(up: Up) -> None:
    with EvalClient(up.authed, timeout=30) as client:
        health = client.health()
        assert health["status"] == "healthy" and isinstance(health["queue_size"], int) and health["timestamp"]
        assert client.is_healthy()
        assert "evalq_demo" in _listed(client, "tasks", "evalq_demo")
        assert "dummy" in _listed(client, "models", "dummy")


@pytest.mark.slow
def test_evaluate_then_wait_for_job_gives_metrics_and_downloadable_files(up: Up) -> None:
    with EvalClient(up.authed, timeout=30) as client:
        submitted = client.evaluate(**DEMO)
        assert submitted["status"] == "queued" and isinstance(submitted["position_in_queue"], int)
        job = client.wait_for_job(submitted["job_id"], poll_interval=0.2, timeout=240, verbose=False)
    assert job["status"] == "completed" and job["request"]["tasks"] == ["evalq_demo"]
    assert job["result"]["metrics"]["evalq_demo"]["exact_match"] == pytest.approx(0.6)
    files = job["result"]["dummy"]
    # The URLs are the web process's own, served from the object store, with the same token.
    assert files["results"].startswith(up.web_url) and files["samples"]
    with httpx.Client(auth=("evalq", TOKEN), timeout=30) as http:
        results = http.get(files["results"])
        assert results.status_code == 200
        assert results.json()["results"]["evalq_demo"]["exact_match,none"] == pytest.approx(0.6)
        samples = http.get(files["samples"][0])
        assert samples.status_code == 200
        assert len([json.loads(line) for line in samples.text.splitlines() if line.strip()]) == 20
        # Only the job's own artifacts are served: no way out of its folder.
        escape = http.get(f"{up.web_url}/jobs/{job['job_id']}/files/..%2F..%2Fetc%2Fpasswd")
        assert escape.status_code == 404


async def test_async_client_unknown_job_cancel_queued_and_queue(up: Up) -> None:
    # A pool with no worker keeps its jobs queued, so the cancel below finds one queued.
    code, _, err = await run_command([*EVALQ, "setup", "--pool", "parked"], up.env, timeout=60)
    assert code == 0, err
    async with AsyncEvalClient(up.authed, timeout=30) as client:
        with pytest.raises(httpx.HTTPStatusError) as unknown:
            await client.get_job("00000000-0000-4000-8000-000000000000")
        assert unknown.value.response.status_code == 404
        assert unknown.value.response.json() == {"detail": "Job 00000000-0000-4000-8000-000000000000 not found"}

        submitted = await client.evaluate(**DEMO, pool="parked", labels={"via": "lmms-eval-api"})
        job_id = submitted["job_id"]
        queue = await client.get_queue_status()
        assert job_id in queue["queued_jobs"] and queue["queue_size"] >= 1
        assert {"running_job", "completed_jobs", "failed_jobs"} <= queue.keys()
        job = await client.get_job(job_id)
        assert job["status"] == "queued" and job["position_in_queue"] == 0 and job["labels"] == {"via": "lmms-eval-api"}

        cancelled = await client.cancel_job(job_id)
        assert cancelled["message"] == f"Job {job_id} cancelled"
        assert (await client.get_job(job_id))["status"] == "cancelled"
        assert job_id not in (await client.get_queue_status())["queued_jobs"]
        with pytest.raises(httpx.HTTPStatusError) as again:
            await client.cancel_job(job_id)
        assert again.value.response.status_code == 400  # lmms-eval's code for a finished job


async def test_bad_input_gets_lmms_eval_422_shape_with_the_location(up: Up) -> None:
    async with httpx.AsyncClient(base_url=up.authed, timeout=30) as http:
        wrong = await http.post("/evaluate", json={"model": "dummy", "tasks": ["evalq_demo", 3]})
        assert wrong.status_code == 422
        (detail,) = wrong.json()["detail"]
        assert detail["loc"] == ["body", "tasks", 1] and "str" in detail["msg"]
        missing = await http.post("/evaluate", json={"model": "dummy"})
        assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "tasks"]
        assert missing.json()["detail"][0]["type"] == "missing"
        broken = await http.post("/evaluate", content=b"{not json", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"


async def test_token_through_the_url_and_nothing_without_it(up: Up) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        bare = await http.get(f"{up.web_url}/health")
        assert bare.status_code == 401 and bare.headers["www-authenticate"].startswith("Basic")
        wrong = await http.get(f"{up.web_url.replace('http://', 'http://evalq:wrong@')}/queue")
        assert wrong.status_code == 401
        bearer = await http.get(f"{up.web_url}/health", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200
    with EvalClient(up.web_url) as anonymous:
        assert not anonymous.is_healthy()
    with EvalClient(up.authed) as client:
        assert client.is_healthy()


async def test_evalq_ui_on_loopback_needs_no_token_and_off_loopback_refuses_without_one(
    up: Up, processes: Processes
) -> None:
    env = {key: value for key, value in up.env.items() if key != "EVALQ_UI_TOKEN"}
    code, out, err = await run_command([*EVALQ, "ui", "--host", "0.0.0.0"], env, timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and "token" in lines[0], err

    proc = processes.start([*EVALQ, "ui", "--port", str(free_port())], {**env, "PYTHONUNBUFFERED": "1"}, name="ui")
    url = _wait_for_line(proc, proc.log_path, r"evalq ui: (http://\S+);").group(1)  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        index = await http.get("/")
        assert index.status_code == 200 and index.json()["lmms_eval_api"] is False
        # Read-only by default: the API that submits is served only with --lmms-eval-api.
        assert (await http.post("/evaluate", json=DEMO)).status_code == 404


@pytest.mark.slow
async def test_api_and_cli_see_the_same_jobs(up: Up) -> None:
    async with AsyncEvalClient(up.authed, timeout=30) as client:
        through_api = (await client.evaluate(**DEMO, limit=2))["job_id"]
        code, out, err = await run_command(
            [*EVALQ, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--limit", "2", "--json"], up.env
        )
        assert code == 0, err
        through_cli = json.loads(out)["job_id"]

        # The API's job, followed with `evalq watch` to its end.
        code, out, err = await run_command([*EVALQ, "watch", through_api, "--json"], up.env, timeout=240)
        assert code == 0, err
        events: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
        assert events[0]["type"] == "queued" and events[-1]["type"] == "completed"
        assert all(event["job_id"] == through_api for event in events)

        # The CLI's job, seen and waited for through the API.
        seen = await client.get_job(through_cli)
        assert seen["job_id"] == through_cli and seen["request"]["model"] == "dummy"
        done = await client.wait_for_job(through_cli, poll_interval=0.2, timeout=240, verbose=False)
        assert done["status"] == "completed" and "evalq_demo" in done["result"]["metrics"]


@pytest.mark.parametrize(
    ("path", "message", "loc"),
    [
        ("$.tasks[0]", "Expected `str`, got `int`", ["body", "tasks", 0]),
        ("$.labels.run", "Expected a label with no control character", ["body", "labels", "run"]),
        ("$", "Object missing required field `tasks`", ["body", "tasks"]),
        ("$", "Object contains unknown field `modle`", ["body", "modle"]),
        (None, "bad", ["body"]),
    ],
)
def test_json_paths_become_fastapi_locations(path: str | None, message: str, loc: list[Any]) -> None:
    assert body_location(path, message) == loc


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("evalq.example", False),
    ],
)
def test_only_loopback_needs_no_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        check_exposure(UiSettings(ui_host=host))
    else:
        with pytest.raises(ConfigError, match="token"):
            check_exposure(UiSettings(ui_host=host))
        check_exposure(UiSettings(ui_host=host, ui_token="t"))
