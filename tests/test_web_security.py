"""Attacks on the web process from a web page elsewhere, through a visitor's browser.

Each test runs the real web process (`WebServer`, the shipped loopback configuration: no
token, the lmms-eval API and the dashboard's cancel on) on a random loopback port in front of a
gateway on this test's own prefix, and speaks HTTP to it over TCP with httpx, sending the headers
a browser sends for the attack: an HTML form's or a `no-cors` fetch's body types and `Origin`
(cross-site submission) and a `Host` naming another site (DNS rebinding).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from lmms_eval.entrypoints.client import AsyncEvalClient

from evalq import AsyncClient
from evalq.config import Settings
from evalq.web import WebServer

from .jobs import FAKE

TASK = "fake"
EVIL = "http://evil.example"
BODY = json.dumps({"model": "dummy", "tasks": [TASK]}).encode()
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def server(settings: Settings, client: AsyncClient) -> AsyncIterator[WebServer]:
    """`evalq up`'s web process: loopback, no token, lmms-eval's API on; the dashboard's cancel too."""
    async with WebServer(settings.with_(ui_port=0, lmms_eval_api=True, ui_allow_cancel=True), client) as web:
        yield web


@pytest.fixture
async def http(server: WebServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as session:
        yield session


def port_of(server: WebServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def queued(client: AsyncClient) -> int:
    return (await client.queue()).queue_size


# --- cross-site submission -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        # What an HTML form on any page sends: refused for its origin, and for its type.
        ({"Content-Type": "text/plain", "Origin": EVIL}, 403),
        ({"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({}, 415),  # a body with no type, as a no-cors fetch of a Blob sends it
        ({**JSON, "Origin": EVIL}, 403),
        ({**JSON, "Origin": "null"}, 403),  # a sandboxed frame, a file:// page
        ({**JSON, "Origin": "http://127.0.0.1:1"}, 403),  # another port of this machine is another origin
        ({**JSON, "Sec-Fetch-Site": "cross-site"}, 403),
        ({**JSON, "Sec-Fetch-Site": "same-site"}, 403),  # another port of localhost is the same site
    ],
)
async def test_a_cross_site_or_non_json_submission_is_refused_and_queues_nothing(
    http: httpx.AsyncClient, client: AsyncClient, headers: dict[str, str], code: int
) -> None:
    reply = await http.post("/evaluate", content=BODY, headers=headers)
    assert reply.status_code == code, reply.text
    assert isinstance(reply.json()["detail"], str) and reply.json()["detail"]
    assert await queued(client) == 0


async def test_a_cross_site_cancel_is_refused(http: httpx.AsyncClient, client: AsyncClient) -> None:
    job_id = (await client.submit(model="dummy", tasks=[TASK])).job_id
    refused = [
        await http.delete(f"/jobs/{job_id}", headers={"Origin": EVIL}),
        await http.delete(f"/jobs/{job_id}", headers={"Sec-Fetch-Site": "cross-site"}),
        await http.post(f"/api/jobs/{job_id}/cancel", headers={"X-Evalq-Ui": "1", "Origin": EVIL}),
        await http.post(f"/api/jobs/{job_id}/cancel", headers={"X-Evalq-Ui": "1", "Sec-Fetch-Site": "same-site"}),
    ]
    assert [reply.status_code for reply in refused] == [403, 403, 403, 403]
    form = await http.post(
        f"/api/jobs/{job_id}/cancel", content=b"x=1", headers={"X-Evalq-Ui": "1", "Content-Type": "text/plain"}
    )
    assert form.status_code == 415
    assert (await client.get_job(job_id)).status == "queued"


async def test_same_origin_and_clients_without_an_origin_still_submit_and_cancel(
    server: WebServer, http: httpx.AsyncClient, client: AsyncClient
) -> None:
    port = port_of(server)
    for headers in (
        {},  # curl, scripts, lmms-eval's clients
        {"Origin": server.url},
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ):
        reply = await http.post("/evaluate", content=BODY, headers={"Content-Type": "application/json", **headers})
        assert reply.status_code == 200, (headers, reply.text)
    charset = await http.post("/evaluate", content=BODY, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert charset.status_code == 200, charset.text
    assert await queued(client) == 6

    async with AsyncEvalClient(server.url, timeout=30) as lmms:
        job_id = (await lmms.evaluate(model="dummy", tasks=[TASK]))["job_id"]
        assert (await lmms.cancel_job(job_id))["status"] == "cancelled"
    other = (await client.submit(model="dummy", tasks=[TASK])).job_id
    cancel = await http.post(f"/api/jobs/{other}/cancel", headers={"X-Evalq-Ui": "1", "Origin": server.url})
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"


# --- DNS rebinding -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/queue", "/api/jobs/{id}", "/jobs/{id}", "/queue", "/health", "/", "/api/jobs"])
async def test_a_request_for_another_host_name_is_refused(
    server: WebServer, http: httpx.AsyncClient, client: AsyncClient, path: str
) -> None:
    job_id = (await client.submit(model="dummy", tasks=[TASK], labels={"secret": "s"})).job_id
    for host in ("evil.example", f"evil.example:{port_of(server)}"):
        reply = await http.get(path.format(id=job_id), headers={"Host": host})
        assert reply.status_code == 400, (host, reply.text)
        assert "secret" not in reply.text and "Host" in reply.json()["detail"]
    refused = await http.post("/evaluate", content=BODY, headers={**JSON, "Host": "evil.example"})
    assert refused.status_code == 400 and await queued(client) == 1


async def test_the_names_of_a_loopback_bind_and_the_configured_ones_are_answered(
    settings: Settings, client: AsyncClient
) -> None:
    configured = settings.with_(ui_port=0, ui_allowed_hosts=["evalq.example", "proxy.example:8443"])
    async with WebServer(configured, client) as server, httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        port = port_of(server)
        answered = [
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"LocalHost:{port}",
            f"[::1]:{port}",
            "evalq.example",
            "evalq.example:443",
            "proxy.example:8443",
        ]
        refused = [
            "evil.example",
            f"evil.example:{port}",
            f"127.0.0.1.evil.example:{port}",
            f"localhost:{port + 1}",
            "localhost",
            "proxy.example",
            "proxy.example:8444",
            f"127.0.0.1:{port}@evil.example",
            "[::1",
            "",
        ]
        got = {host: (await http.get("/api/queue", headers={"Host": host})).status_code for host in answered + refused}
    assert got == {**{host: 200 for host in answered}, **{host: 400 for host in refused}}


async def test_result_urls_come_from_the_configuration_never_from_the_host(
    settings: Settings, client: AsyncClient, worker_factory: Any
) -> None:
    await worker_factory(evaluator=FAKE)
    job_id = (await client.submit(model="dummy", tasks=[TASK], limit=2, model_args="samples=2")).job_id
    assert (await client.wait_for_job(job_id, timeout=60)).status == "completed"

    async with WebServer(settings.with_(ui_port=0, lmms_eval_api=True), client) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            reply = await http.get(f"/jobs/{job_id}", headers={"Host": f"localhost:{port_of(server)}"})
        files = reply.json()["result"]["dummy"]
        assert files["results"] == f"{server.url}/jobs/{job_id}/files/results.json"
        assert files["samples"] and all(
            url.startswith(f"{server.url}/jobs/{job_id}/files/") for url in files["samples"]
        )

    public = settings.with_(ui_port=0, lmms_eval_api=True, ui_public_url="https://evalq.example/queue/")
    async with WebServer(public, client) as server, httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        reply = await http.get(f"/jobs/{job_id}", headers={"Host": "evalq.example"})
        assert reply.status_code == 200, reply.text
        results = reply.json()["result"]["dummy"]["results"]
        assert results == f"https://evalq.example/queue/jobs/{job_id}/files/results.json"
