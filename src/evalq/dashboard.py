"""The dashboard: the web process's pages (queue, job, trends, compare) and their JSON and SSE feeds.

The pages are static files of this package (`evalq/ui/`): one HTML shell, one script and one
stylesheet, written for this project, with no CDN and nothing fetched from outside, so the
dashboard works on an air-gapped cluster. The script renders every string it is given as text
(`textContent`), never as markup, and the pages carry a Content-Security-Policy that allows
only the process's own script: a label such as `<img src=x onerror=alert(1)>` is shown, not run.

Live updates are pushed, never polled: `/api/stream` is one server-sent-events endpoint. With
no `job` it relays one shared follower of every event (`AsyncClient.events()`, no consumer) and
each update of the workers bucket to all the browsers connected; with `job=<id>` it sends that
job's events from its first (`events(job_id, history=True)`) and then as they happen.

Read-only by default: the only route that changes anything, `POST /api/jobs/<id>/cancel`, exists
only when `ui_allow_cancel` is on, and it asks for a header a cross-site form cannot send.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any, get_args

import msgspec

from . import jetstream
from .errors import AmbiguousJobId, EvalqError, JobNotFound, RequestError, WrongState
from .flips import FlipsRefused, flips, sample_view, samples_files
from .schemas import JOBS_PAGE_MAX, TERMINAL, JobInfo, JobStatus, JobSummary, encode
from .text import strip_ansi
from .turnaround import read_turnaround
from .webguard import artifact_response

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute

    from .config import UiSettings
    from .publisher import AsyncClient

__all__ = ["EventHub", "dashboard_routes", "sample_view"]

log = logging.getLogger("evalq.dashboard")

# Only the process's own files: no inline script, no other origin, images only from data: URIs
# (a sample's inline images) and this origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Bounds on what one request reads from the object store.
LOG_TAIL_BYTES = 256 * 1024
SAMPLES_FILE_BYTES = 256 * 1024 * 1024
SAMPLES_PAGE_MAX = 100
HISTORY_MAX = 20_000
FLIPS_MAX = 500
STATUSES: tuple[str, ...] = get_args(JobStatus)
KEEPALIVE_S = 15.0
# What this process sends as an event's `id`: a count, ASCII digits (`str.isdigit` takes `²`).
_EVENT_ID = re.compile(r"[0-9]{1,18}")


def _asset(name: str) -> bytes:
    return resources.files("evalq").joinpath("ui", name).read_bytes()


def _startup_s(client: AsyncClient) -> float:
    """How long a follower (`AsyncClient.events`) may take to start: its `nc.flush()`'s own bound.

    nats-py's flush, cancelled before its PONG comes, leaves a cancelled future that the PONG
    then fails on, and that ends the connection's read loop: every later request of this process
    would time out. So a follower is cancelled only once it has an event or is past this.
    """
    return math.ceil(client.settings.connection.request_timeout) + 1.0


# --- the shared live feed ---------------------------------------------------------------------


class EventHub:
    """One follower of every event and of the workers bucket, fanned out to each SSE subscriber.

    It runs only while someone listens: the first subscriber starts it, the last one leaving
    stops it (not before the follower is past its start, `_startup_s`). A subscriber too slow
    to keep up loses its oldest messages rather than holding the others back (its page reloads
    the queue when told it fell behind).
    """

    QUEUE_MAX = 2048

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.subscribers: set[asyncio.Queue[bytes]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._workers_sub: Any = None
        self._started = 0.0
        self._closer: asyncio.Task[None] | None = None

    async def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(self.QUEUE_MAX)
        self.subscribers.add(queue)
        if not self._tasks:
            self._started = time.monotonic()
            self._tasks = [asyncio.create_task(self._follow_events())]
            with contextlib.suppress(Exception):  # a user without the right to follow the bucket sees no live workers
                bucket = self.client.topology.workers_bucket
                self._workers_sub = await self.client.nc.subscribe(
                    jetstream.kv_subject(bucket, ">"), cb=self._on_worker
                )
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        """Called where the leaving response is being cancelled: the stop runs as its own task."""
        self.subscribers.discard(queue)
        if not self.subscribers and self._tasks and self._closer is None:
            self._closer = asyncio.create_task(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        try:
            await asyncio.sleep(max(0.0, self._started + _startup_s(self.client) - time.monotonic()))
        finally:
            self._closer = None
        if not self.subscribers:
            await self.close()

    async def close(self) -> None:
        # Both are taken before any wait, so a subscriber arriving meanwhile starts afresh.
        tasks, self._tasks = self._tasks, []
        sub, self._workers_sub = self._workers_sub, None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def publish(self, kind: str, data: bytes) -> None:
        message = f"event: {kind}\ndata: ".encode() + data + b"\n\n"
        for queue in self.subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(b"event: behind\ndata: {}\n\n")
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(message)

    async def _follow_events(self) -> None:
        while True:
            self._started = time.monotonic()
            try:
                async for event in self.client.events():
                    self.publish("job", encode(event))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost connection: the follower starts again, the pages reload
                log.warning("the dashboard's event follower stopped (%s); it starts again", exc)
                self.publish("behind", b"{}")
                await asyncio.sleep(1.0)

    async def _on_worker(self, msg: Any) -> None:
        worker_id = msg.subject.rsplit(".", 1)[-1]
        operation = (msg.headers or {}).get("KV-Operation", "")
        if operation in ("DEL", "PURGE") or not msg.data:
            self.publish("worker_gone", json.dumps({"worker_id": worker_id}).encode())
            return
        self.publish("worker", msg.data)


# --- helpers ------------------------------------------------------------------------------------


def _json(content: Any, status: int = 200) -> Response:
    from starlette.responses import Response

    return Response(
        msgspec.json.encode(content),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def _error(message: str, status: int) -> Response:
    return _json({"detail": message}, status)


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadQuery(f"`{name}` must be an integer, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise _BadQuery(f"`{name}` must be between {low} and {high}, got {value}")
    return value


class _BadQuery(Exception):
    pass


def _instant(request: Request, name: str) -> dt.datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw)
    except ValueError:
        value = None
    # A time without its zone would mean another instant on the gateway's machine.
    if value is None or value.tzinfo is None:
        raise _BadQuery(f"`{name}` must be an RFC 3339 time with its zone (2026-01-31T12:00:00Z), got {raw[:40]!r}")
    return value


def _filters(request: Request) -> dict[str, Any]:
    """The history's filters of a query: `status` (repeated, or separated by commas), `pool`,
    `team`, `label=k=v` (each must hold), `created_after` and `created_before`."""
    params = request.query_params
    labels = {}
    for item in params.getlist("label"):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise _BadQuery(f"`label` must be k=v, got {item[:80]!r}")
        labels[key] = value
    filters: dict[str, Any] = {"labels": labels}
    statuses = [s.strip() for given in params.getlist("status") for s in given.split(",") if s.strip()]
    for status in statuses:
        if status not in STATUSES:
            raise _BadQuery(f"`status` must be one of {', '.join(STATUSES)}, got {status[:40]!r}")
    if statuses:
        filters["status"] = statuses
    for field in ("pool", "team"):
        if params.get(field):
            filters[field] = params[field]
    for field in ("created_after", "created_before"):
        when = _instant(request, field)
        if when is not None:
            filters[field] = when
    return filters


def _strip(text: str) -> str:
    return strip_ansi(text.replace("\r", "\n"))


def _summary(info: JobInfo | JobSummary) -> dict[str, Any]:
    """What the trends and compare pages need of a job's record or history summary."""
    if isinstance(info, JobSummary):
        return {
            "job_id": info.job_id,
            "status": info.status,
            "pool": info.pool,
            "labels": info.labels,
            "created_at": info.created_at,
            "completed_at": info.completed_at,
            "model": info.model,
            "tasks": info.tasks,
            "metrics": info.metrics,
            "team": info.team,
            "priority": info.priority,
            "gate": info.gate,
            "verdict": info.verdict,
        }
    request = info.request
    return {
        "job_id": info.job_id,
        "status": info.status,
        "pool": info.pool,
        "labels": info.labels,
        "created_at": info.created_at,
        "completed_at": info.completed_at,
        "model": request.model if request else None,
        "tasks": request.tasks if request else [],
        "metrics": info.result.metrics if info.result else {},
        "team": info.team,
        "priority": request.priority if request else "normal",
        "gate": request.gate if request else None,
        "verdict": info.verdict.verdict if info.verdict else None,
    }


async def history(client: AsyncClient, **filters: Any) -> AsyncIterator[JobSummary]:
    """Past jobs, newest first, with all their metrics, through the gateway's `jobs` endpoint."""
    async for summary in client.iter_jobs(metrics=["*"], **filters):
        yield summary


# --- routes -------------------------------------------------------------------------------------


def dashboard_routes(client: AsyncClient, ui: UiSettings) -> list[BaseRoute]:
    """The pages, their assets and their JSON/SSE feeds, ahead of any other route of the app."""
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Match, Route

    hub = EventHub(client)
    shell = _asset("index.html")
    assets = {name: _asset(name) for name in _STATIC}
    samples_cache: OrderedDict[tuple[str, str], list[dict[str, Any]]] = OrderedDict()

    class PageRoute(Route):
        """A page is served to a browser (`Accept: text/html`); a script asking the same path for
        JSON falls through to the routes behind (lmms-eval's `GET /jobs/{id}`, the index's JSON)."""

        def matches(self, scope: Any) -> tuple[Match, Any]:
            match, child = super().matches(scope)
            if match is Match.NONE:
                return match, child
            accept = dict(scope.get("headers") or []).get(b"accept", b"")
            return (match, child) if b"text/html" in accept else (Match.NONE, {})

    async def page(request: Request) -> Response:
        return Response(shell, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in assets:
            return _error("no such file", 404)
        return Response(assets[name], media_type=_STATIC[name], headers={"X-Content-Type-Options": "nosniff"})

    async def resolve(given: str) -> str:
        """A full id, or a unique prefix of one (as `evalq status` takes)."""
        return await client.resolve(given)

    def refusal(exc: Exception) -> Response:
        if isinstance(exc, _BadQuery):
            return _error(str(exc), 400)
        if isinstance(exc, JobNotFound):
            return _error(str(exc), 404)
        if isinstance(exc, AmbiguousJobId):
            return _error(str(exc), 409)
        if isinstance(exc, WrongState):
            return _error(str(exc), 409)
        if isinstance(exc, RequestError):
            return _error(str(exc), exc.code)  # the gateway's own answer to a bad filter: 4xx, or 503
        if isinstance(exc, EvalqError):
            return _error(str(exc), 502)
        raise exc

    async def queue(request: Request) -> Response:
        try:
            status = await client.queue()
            # Running jobs are as many as the workers; their records carry progress and pieces.
            # Queued jobs are shown from the queue's reply alone, however many there are.
            running = await asyncio.gather(*(client.get_job(j) for j in status.running_jobs), return_exceptions=True)
        except EvalqError as exc:
            return refusal(exc)
        return _json(
            {
                "queue": status,
                "running": [info for info in running if isinstance(info, JobInfo)],
                "allow_cancel": ui.ui_allow_cancel,
            }
        )

    async def teams(request: Request) -> Response:
        try:
            return _json(await client.teams())
        except EvalqError as exc:
            return refusal(exc)

    async def job(request: Request) -> Response:
        try:
            info = await client.get_job(await resolve(request.path_params["job_id"]))
            # A checkpoint's turnaround, from the record and two of its stored events: computed
            # for each answer, since the page asks again after each event of the job.
            spent = await read_turnaround(client.reads, info)
        except EvalqError as exc:
            return refusal(exc)
        allow_cancel = ui.ui_allow_cancel and info.status not in TERMINAL
        return _json({"job": info, "turnaround": spent, "allow_cancel": allow_cancel})

    async def log_tail(request: Request) -> Response:
        try:
            job_id = await resolve(request.path_params["job_id"])
            lines = _int(request, "lines", 200, 1, 5000)
            artifact = await client.artifact(job_id, "eval.log")
            if artifact is None:
                await client.get_job(job_id)  # no log yet, or no such job: the latter is 404
                return _json({"lines": [], "size": 0})
            kept = bytearray()
            async for chunk in artifact.chunks():
                kept += chunk
                if len(kept) > LOG_TAIL_BYTES:
                    del kept[: len(kept) - LOG_TAIL_BYTES]
        except (EvalqError, _BadQuery) as exc:
            return refusal(exc)
        text = _strip(kept.decode(errors="replace"))
        shown = [line for line in text.split("\n") if line.strip()][-lines:]
        return _json({"lines": shown, "size": artifact.size})

    async def download(request: Request) -> Response:
        try:
            job_id = await resolve(request.path_params["job_id"])
            artifact = await client.artifact(job_id, request.path_params["name"])
        except EvalqError as exc:
            return refusal(exc)
        if artifact is None:
            return _error("no such artifact", 404)
        return artifact_response(artifact)

    async def read_samples(job_id: str, name: str) -> list[dict[str, Any]] | None:
        key = (job_id, name)
        if key in samples_cache:
            samples_cache.move_to_end(key)
            return samples_cache[key]
        artifact = await client.artifact(job_id, name)
        if artifact is None:
            return None
        if artifact.size > SAMPLES_FILE_BYTES:
            raise _BadQuery(f"{name} holds {artifact.size} bytes, more than the browser reads; download it")
        data = bytearray()
        async for chunk in artifact.chunks():
            data += chunk
        rows = []
        for line in data.decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
        samples_cache[key] = rows
        while len(samples_cache) > 4:
            samples_cache.popitem(last=False)
        return rows

    async def samples(request: Request) -> Response:
        try:
            job_id = await resolve(request.path_params["job_id"])
            info = await client.get_job(job_id)
            files = [
                name[len(job_id) + 1 :]
                for name in (info.result.artifacts if info.result else [])
                if name.startswith(f"{job_id}/samples/")
            ]
            if not files:
                return _json({"files": [], "file": None, "total": 0, "offset": 0, "samples": []})
            name = request.query_params.get("file") or files[0]
            if name not in files:
                return _error(f"the job has no samples file {name[:200]!r}", 404)
            offset = _int(request, "offset", 0, 0, 10**9)
            limit = _int(request, "limit", 10, 1, SAMPLES_PAGE_MAX)
            rows = await read_samples(job_id, name)
        except (EvalqError, _BadQuery) as exc:
            return refusal(exc)
        if rows is None:
            return _error(f"{name} is not in the object store", 404)
        metric_names = {m for task in (info.result.metrics if info.result else {}).values() for m in task}
        page_rows = [sample_view(row, metric_names) for row in rows[offset : offset + limit]]
        return _json({"files": files, "file": name, "total": len(rows), "offset": offset, "samples": page_rows})

    async def jobs_list(request: Request) -> Response:
        try:
            filters = _filters(request)
            limit = _int(request, "limit", 5000, 1, HISTORY_MAX)
            found = []
            async for info in history(client, **filters):
                found.append(_summary(info))
                if len(found) >= limit:
                    break
        except (EvalqError, _BadQuery) as exc:
            return refusal(exc)
        return _json({"jobs": found, "truncated": len(found) >= limit})

    async def history_page(request: Request) -> Response:
        """One page of the history, newest first; `cursor` is the page before's `next_cursor`."""
        try:
            filters = _filters(request)
            limit = _int(request, "limit", 50, 1, JOBS_PAGE_MAX)
            cursor = request.query_params.get("cursor") or None
            page = await client.jobs(**filters, limit=limit, cursor=cursor)
        except (EvalqError, _BadQuery) as exc:
            return refusal(exc)
        return _json({"jobs": [_summary(info) for info in page.jobs], "next_cursor": page.next_cursor})

    async def compare_flips(request: Request) -> Response:
        params = request.query_params
        given = {name: (params.get(name) or "").strip() for name in ("a", "b", "task", "metric")}
        missing = [name for name, value in given.items() if not value]
        if missing:
            return _error(f"flips need `a`, `b`, `task` and `metric`; missing {', '.join(missing)}", 400)
        task, metric = given["task"], given["metric"]
        try:
            limit = _int(request, "limit", 100, 1, FLIPS_MAX)
            infos = [await client.get_job(await resolve(given[side])) for side in ("a", "b")]
            rows = []
            for info in infos:
                names = samples_files(info.job_id, info.result.artifacts if info.result else [], task)
                if not names:
                    return _error(f"job {info.job_id} logged no samples of task {task[:200]!r}", 404)
                found: list[dict[str, Any]] = []
                for name in names:
                    found += await read_samples(info.job_id, name) or []
                rows.append(found)
            names_a = {m.split(",")[0] for m in ((infos[0].result.metrics if infos[0].result else {}).get(task) or {})}
            answer = flips(rows[0], rows[1], metric, names_a | {metric.split(",")[0]}, limit)
        except (EvalqError, _BadQuery) as exc:
            return refusal(exc)
        except FlipsRefused as exc:
            return _error(str(exc), 422)
        return _json({"a": infos[0].job_id, "b": infos[1].job_id, "task": task, **answer})

    async def compare(request: Request) -> Response:
        given = [j.strip() for j in request.query_params.get("jobs", "").split(",") if j.strip()]
        if not 1 <= len(given) <= 20:
            return _error("`jobs` must name 1 to 20 jobs, separated by commas", 400)
        try:
            ids = [await resolve(j) for j in given]
            infos = await asyncio.gather(*(client.get_job(j) for j in ids))
        except EvalqError as exc:
            return refusal(exc)
        return _json({"jobs": [_summary(info) for info in infos]})

    async def cancel(request: Request) -> Response:
        # A cross-site form can POST to a loopback port, but it cannot add a header without a
        # CORS preflight, which this process never answers.
        if request.headers.get("x-evalq-ui") != "1":
            return _error("cancel needs the X-Evalq-Ui header the dashboard sends", 403)
        try:
            reply = await client.cancel_job(await resolve(request.path_params["job_id"]))
        except EvalqError as exc:
            return refusal(exc)
        return _json(reply)

    async def stream(request: Request) -> Response:
        job_id = request.query_params.get("job")
        if job_id is not None:
            try:
                job_id = await resolve(job_id)
                await client.get_job(job_id)
            except EvalqError as exc:
                return refusal(exc)
            # A reconnecting EventSource says how many it had: those are not sent twice.
            seen = request.headers.get("last-event-id", "0")
            if not _EVENT_ID.fullmatch(seen):
                return _error(f"Last-Event-ID must be the number of an event this stream sent, got {seen[:40]!r}", 400)
            events = client.events(job_id, history=True).__aiter__()
            # The follower's start runs here, before the response, where a client that leaves
            # cancels nothing (`_startup_s`); it ends with the job's first event.
            first = asyncio.ensure_future(events.__anext__())
            await asyncio.wait({first}, timeout=_startup_s(client))
            if first.done() and not first.cancelled():
                error = first.exception()
                if isinstance(error, EvalqError):
                    return refusal(error)
            return StreamingResponse(
                _job_events(events, first, int(seen)), media_type="text/event-stream", headers=_SSE_HEADERS
            )
        return StreamingResponse(_hub_events(hub), media_type="text/event-stream", headers=_SSE_HEADERS)

    routes: list[BaseRoute] = [
        PageRoute("/", page, methods=["GET"]),
        PageRoute("/jobs", page, methods=["GET"]),
        PageRoute("/jobs/{job_id}", page, methods=["GET"]),
        PageRoute("/trends", page, methods=["GET"]),
        PageRoute("/compare", page, methods=["GET"]),
        Route("/ui/{name}", asset, methods=["GET"]),
        Route("/api/queue", queue, methods=["GET"]),
        Route("/api/teams", teams, methods=["GET"]),
        Route("/api/jobs", jobs_list, methods=["GET"]),
        Route("/api/history", history_page, methods=["GET"]),
        Route("/api/compare", compare, methods=["GET"]),
        Route("/api/compare/flips", compare_flips, methods=["GET"]),
        Route("/api/stream", stream, methods=["GET"]),
        Route("/api/jobs/{job_id}", job, methods=["GET"]),
        Route("/api/jobs/{job_id}/log", log_tail, methods=["GET"]),
        Route("/api/jobs/{job_id}/samples", samples, methods=["GET"]),
        Route("/api/jobs/{job_id}/files/{name:path}", download, methods=["GET"]),
    ]
    if ui.ui_allow_cancel:
        routes.append(Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]))
    return routes


_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "X-Content-Type-Options": "nosniff"}


async def _hub_events(hub: EventHub) -> AsyncIterator[bytes]:
    queue = await hub.subscribe()
    try:
        yield b"event: hello\ndata: {}\n\n"
        while True:
            try:
                yield await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keepalive\n\n"
    finally:
        hub.unsubscribe(queue)


async def _job_events(events: AsyncIterator[Any], first: asyncio.Future[Any], skip: int) -> AsyncIterator[bytes]:
    """The job's events after the first `skip`; `first` is the follower's first step, already started."""
    count = 0
    pending: asyncio.Future[Any] | None = first
    try:
        yield b"event: hello\ndata: {}\n\n"
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
            if not done:
                yield b": keepalive\n\n"
                continue
            event, pending = pending.result(), None
            count += 1
            if count > skip:
                yield f"id: {count}\nevent: job\ndata: ".encode() + encode(event) + b"\n\n"
    except StopAsyncIteration:
        return
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
