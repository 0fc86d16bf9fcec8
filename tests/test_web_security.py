"""Attacks on the web process from a web page elsewhere, through a visitor's browser.

Each test runs the real web process (`WebServer`, the shipped loopback configuration: no
token, the lmms-eval API and the dashboard's cancel on) on a random loopback port in front of a
gateway on this test's own prefix, and speaks HTTP to it over TCP with httpx, sending the headers
a browser sends for the attack: an HTML form's or a `no-cors` fetch's body types and `Origin`
(cross-site submission), a `Host` naming another site (DNS rebinding), and hostile bodies and
header values (which must get a 4xx, never a 5xx, and the refusals the NATS subject gives).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from lmms_eval.entrypoints.client import AsyncEvalClient

from evalq import AsyncClient
from evalq.config import Settings, UiSettings
from evalq.web import WebServer
from evalq.webguard import allowed_hosts, public_url

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


@pytest.mark.parametrize(
    ("bind", "answered", "refused"),
    [
        ("::1", ["[::1]:8642", "localhost:8642", "127.0.0.1:8642"], ["[::1]:8643", "evil.example:8642"]),
        ("127.0.0.1", ["127.0.0.1:8642"], ["127.0.0.2:8642", "0.0.0.0:8642"]),
        ("10.0.0.5", ["10.0.0.5:8642"], ["localhost:8642", "127.0.0.1:8642", "10.0.0.6:8642"]),
        # Bound to every address: any address literal (no DNS answer rebinds one) and the machine's name.
        (
            "0.0.0.0",
            ["10.1.2.3:8642", "10.1.2.3:9000", "[fe80::1]:8642", f"{socket.gethostname()}:8642"],
            ["evil.example:8642"],
        ),
    ],
)
def test_the_host_names_each_bind_answers(bind: str, answered: list[str], refused: list[str]) -> None:
    hosts = allowed_hosts(UiSettings(ui_host=bind, ui_port=8642))
    assert {host: hosts.admit(host) for host in answered + refused} == {
        **{host: True for host in answered},
        **{host: False for host in refused},
    }
    port80 = allowed_hosts(UiSettings(ui_host=bind, ui_port=80))
    assert port80.admit(answered[0].rsplit(":", 1)[0]) and port80.admit(answered[0].rsplit(":", 1)[0] + ":80")


def test_the_default_public_url_is_the_bind_address() -> None:
    assert public_url(UiSettings(ui_port=8642)) == "http://127.0.0.1:8642"
    assert public_url(UiSettings(ui_host="::1", ui_port=8642)) == "http://[::1]:8642"
    assert (
        public_url(UiSettings(ui_host="0.0.0.0", ui_port=8642, ui_token="t")) == f"http://{socket.gethostname()}:8642"
    )
    assert public_url(UiSettings(ui_public_url="https://evalq.example/q/")) == "https://evalq.example/q"


async def test_behind_a_proxy_that_rewrites_host_the_public_origin_may_write(
    settings: Settings, client: AsyncClient
) -> None:
    proxied = settings.with_(ui_port=0, lmms_eval_api=True, ui_public_url="https://evalq.example")
    async with WebServer(proxied, client) as server, httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        ours = await http.post("/evaluate", content=BODY, headers={**JSON, "Origin": "https://evalq.example"})
        assert ours.status_code == 200, ours.text
        theirs = await http.post("/evaluate", content=BODY, headers={**JSON, "Origin": "https://evil.example"})
        assert theirs.status_code == 403
    assert await queued(client) == 1


@pytest.fixture
async def completed(client: AsyncClient, worker_factory: Any) -> str:
    """A completed job with results and samples, by the stand-in evaluator."""
    await worker_factory(evaluator=FAKE)
    job_id = (await client.submit(model="dummy", tasks=[TASK], limit=2, model_args="samples=2")).job_id
    assert (await client.wait_for_job(job_id, timeout=60)).status == "completed"
    return job_id


async def test_result_urls_come_from_the_configuration_never_from_the_host(
    settings: Settings, client: AsyncClient, completed: str
) -> None:
    job_id = completed
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


async def test_the_lmms_eval_apis_files_are_downloads_as_the_dashboards_are(
    http: httpx.AsyncClient, client: AsyncClient, completed: str
) -> None:
    """A job's output (a model's text, an HTML report) must never render as a page of this origin."""
    info = await client.get_job(completed)
    names = [name.split("/", 1)[1] for name in info.result.artifacts] if info.result else []
    assert "results.json" in names and any(name.endswith(".jsonl") for name in names)
    for name in names:
        api = await http.get(f"/jobs/{completed}/files/{name}")
        dashboard = await http.get(f"/api/jobs/{completed}/files/{name}")
        assert api.status_code == dashboard.status_code == 200 and api.content == dashboard.content
        for header in ("content-type", "content-disposition", "x-content-type-options", "content-security-policy"):
            assert api.headers.get(header) == dashboard.headers.get(header), (name, header)
        assert api.headers["content-type"] == "application/octet-stream"
        assert api.headers["content-disposition"].startswith("attachment; filename=")
        assert api.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in api.headers["content-security-policy"]


# --- hostile input -------------------------------------------------------------------------------


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "dummy", "tasks": [TASK], **fields}).encode()


HOSTILE_BODIES = {
    "limit NaN": _body()[:-1] + b', "limit": NaN}',
    "limit Infinity": _body()[:-1] + b', "limit": Infinity}',
    "limit -Infinity": _body()[:-1] + b', "limit": -Infinity}',
    "limit 1e999": _body()[:-1] + b', "limit": 1e999}',
    "timeout 1e999": _body()[:-1] + b', "timeout": 1e999}',
    "model_args 1e999": _body()[:-1] + b', "model_args": {"x": 1e999}}',
    "lone surrogate": b'{"model": "\\ud800", "tasks": ["fake"]}',
    "lone surrogate in a label": _body()[:-1] + b', "labels": {"a": "\\udfff"}}',
    "100,000-deep nesting": b'{"model": "dummy", "tasks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "100,000-deep top level": b"[" * 100_000 + b"]" * 100_000,
    "deep unknown field": b'{"zz": ' + b"{" * 50_000 + b"}" * 50_000 + b"}",
    "invalid UTF-8": b'{"model": "\xff\xfe", "tasks": ["fake"]}',
    "a null where lmms-eval has no Optional": _body(num_gpus=None),
    "a null evalq field": _body(pool=None),
    "top-level array": b"[]",
    "top-level null": b"null",
    "empty": b"",
    "huge int": _body()[:-1] + b', "num_fewshot": ' + b"9" * 5000 + b"}",
    "valid": _body(),
    "valid with Optional nulls": _body(limit=None, model_args=None, device=None),
}


def _mutations(count: int, seed: int = 21) -> dict[str, bytes]:
    """Valid bodies with a few bytes changed: JSON's own tokens, non-finite numbers, broken text."""
    rng = random.Random(seed)
    bases = [_body(), _body(limit=0.5, labels={"run": "a"}, model_args={"x": 1.5}), _body(timeout=60, num_fewshot=2)]
    tokens = [b"NaN", b"Infinity", b"1e999", b"-0", b"null", b'"\\ud800"', b"[", b"]", b"{", b"}", b",", b'"', b"\xff"]
    found = {}
    for index in range(count):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[at:at] = rng.choice(tokens)
            else:
                del data[at : at + rng.randint(1, 4)]
        found[f"mutation {index}"] = bytes(data)
    return found


async def _nats_code(client: AsyncClient, body: bytes) -> int:
    subject = f"{client.settings.queue.prefix}.submit"
    reply = await client.nc.request(subject, body, headers={"Idempotency-Key": str(uuid.uuid4())}, timeout=30)
    return int((reply.headers or {}).get("Nats-Service-Error-Code", 200))


async def test_the_http_api_refuses_exactly_what_the_nats_subject_refuses(
    http: httpx.AsyncClient, client: AsyncClient
) -> None:
    differ = []
    accepted = 0
    for name, body in {**HOSTILE_BODIES, **_mutations(150)}.items():
        reply = await http.post("/evaluate", content=body, headers=JSON)
        nats = await _nats_code(client, body)
        assert reply.status_code < 500, (name, reply.status_code, reply.text)
        if (reply.status_code == 200) != (nats == 200):
            differ.append((name, body[:80], reply.status_code, nats))
        if reply.status_code == 200:
            accepted += 1
            continue
        # lmms-eval's shape for a bad body: FastAPI's list of errors, each with its location.
        detail = reply.json()["detail"]
        assert reply.status_code == 422 and isinstance(detail, list), (name, reply.text)
        assert detail[0]["loc"][0] == "body" and detail[0]["msg"] and detail[0]["type"], (name, detail)
    assert differ == []
    assert accepted >= 2  # the valid bodies (some mutations may stay valid)
    # Every accepted job is queued once by each path, and nothing refused was.
    assert await queued(client) == 2 * accepted


async def test_a_bad_body_names_its_place_as_lmms_eval_does(http: httpx.AsyncClient) -> None:
    nan = await http.post("/evaluate", content=HOSTILE_BODIES["limit NaN"], headers=JSON)
    assert nan.status_code == 422 and nan.json()["detail"][0]["type"] == "json_invalid"
    assert nan.json()["detail"][0]["loc"] == ["body", HOSTILE_BODIES["limit NaN"].index(b"NaN")]
    huge = await http.post("/evaluate", content=HOSTILE_BODIES["timeout 1e999"], headers=JSON)
    assert huge.status_code == 422 and huge.json()["detail"][0]["loc"] == ["body", "timeout"]
    null = await http.post("/evaluate", content=HOSTILE_BODIES["a null evalq field"], headers=JSON)
    assert null.status_code == 422 and null.json()["detail"][0]["loc"] == ["body", "pool"]
    array = await http.post("/evaluate", content=b"[]", headers=JSON)
    assert array.status_code == 422 and array.json()["detail"][0]["type"] == "model_attributes_type"


async def _stream_status(http: httpx.AsyncClient, path: str, headers: dict[str, Any]) -> tuple[int, bytes]:
    """The status of a request whose answer may be an endless event stream, and its first bytes."""
    async with http.stream("GET", path, headers=headers) as reply:
        first = b""
        async for chunk in reply.aiter_bytes():
            first = chunk
            break
        return reply.status_code, first


async def test_a_last_event_id_that_is_not_an_event_number_is_refused(
    http: httpx.AsyncClient, client: AsyncClient
) -> None:
    job_id = (await client.submit(model="dummy", tasks=[TASK])).job_id
    for seen in ("²".encode("latin-1"), b"9" * 5000, b"-1", b"1.0", b"1 2"):
        reply = await http.get(f"/api/stream?job={job_id}", headers={"Last-Event-ID": seen})
        assert reply.status_code == 400 and "Last-Event-ID" in reply.json()["detail"], (seen, reply.text)
    # A reconnecting EventSource's own value still picks up where it left off.
    async with http.stream("GET", f"/api/stream?job={job_id}", headers={"Last-Event-ID": "0"}) as reply:
        assert reply.status_code == 200
        async with asyncio.timeout(10):
            async for line in reply.aiter_lines():
                if line.startswith("id: "):
                    assert line == "id: 1"
                    break


async def test_streams_left_at_once_leave_the_web_process_answering(
    http: httpx.AsyncClient, client: AsyncClient
) -> None:
    """Any page can open an EventSource to this port and close it at once, over and over."""
    job_id = (await client.submit(model="dummy", tasks=[TASK])).job_id
    for _ in range(40):
        for path in (f"/api/stream?job={job_id}", "/api/stream"):
            status, first = await _stream_status(http, path, {})
            assert status == 200 and first.startswith(b"event: hello")
    async with httpx.AsyncClient(base_url=str(http.base_url), timeout=5) as quick:
        assert (await quick.get("/api/queue")).status_code == 200
        assert (await quick.get(f"/api/jobs/{job_id}")).json()["job"]["job_id"] == job_id


HEADER_VALUES: list[bytes] = [
    "²".encode("latin-1"),
    b"9" * 5000,
    b"-1",
    b"",
    b"\x80\xff",
    b"null",
    b"1e999",
    b"text/html, application/json;q=0.9, */*;q=\xff",
    b"%00",
    b'"\\ud800"',
]
HEADERS = ["Last-Event-ID", "Idempotency-Key", "Content-Type", "Origin", "Sec-Fetch-Site", "Accept", "Host"]
ROUTES = [
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/queue"),
    ("GET", "/tasks"),
    ("GET", "/jobs/{id}"),
    ("GET", "/jobs/{id}/files/results.json"),
    ("GET", "/api/queue"),
    ("GET", "/api/jobs"),
    ("GET", "/api/jobs/{id}"),
    ("GET", "/api/jobs/{id}/log"),
    ("GET", "/api/jobs/{id}/samples"),
    ("GET", "/api/compare?jobs={id}"),
    ("GET", "/api/stream?job={id}"),
    ("POST", "/evaluate"),
    ("DELETE", "/jobs/{id}"),
    ("POST", "/api/jobs/{id}/cancel"),
]


async def test_no_header_value_on_any_route_gets_a_5xx(
    settings: Settings, http: httpx.AsyncClient, client: AsyncClient
) -> None:
    job_id = (await client.submit(model="dummy", tasks=[TASK])).job_id
    failures = []
    for method, path in ROUTES:
        for header in HEADERS:
            for value in HEADER_VALUES:
                headers = {header: value, "X-Evalq-Ui": b"1"}
                target = path.format(id=job_id)
                if method == "GET":
                    code, _ = await _stream_status(http, target, headers)
                else:
                    body = BODY if path == "/evaluate" else b""
                    reply = await http.request(method, target, content=body, headers={**JSON, **headers})
                    code = reply.status_code
                if code >= 500:
                    failures.append((method, path, header, value[:20], code))
    # A query string the dashboard's routes parse, in the same spirit.
    for query in ("lines=²", "lines=" + "9" * 5000, "offset=-1", "limit=1e999", "file=../../x", "status=²", "pool=%00"):
        for route in ("/api/jobs/{id}/log", "/api/jobs/{id}/samples", "/api/jobs"):
            code, _ = await _stream_status(http, f"{route.format(id=job_id)}?{query}", {})
            if code >= 500:
                failures.append(("GET", route, "query", query[:20], code))
    # The token's check, with a token set.
    async with (
        WebServer(settings.with_(ui_port=0, ui_token="t0ken"), client) as gated,
        httpx.AsyncClient(base_url=gated.url, timeout=30) as session,
    ):
        for value in HEADER_VALUES:
            for scheme in (b"Basic ", b"Bearer ", b""):
                reply = await session.get("/api/queue", headers={"Authorization": (scheme + value).strip()})
                if reply.status_code != 401:
                    failures.append(("GET", "/api/queue", "Authorization", (scheme + value)[:20], reply.status_code))
    assert failures == []
