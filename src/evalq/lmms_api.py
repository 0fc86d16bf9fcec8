"""lmms-eval's server API (`lmms_eval/entrypoints/http_server.py`, 0.7.3) over evalq.

The same paths, request and response shapes (`protocol.py`) and status codes, so lmms-eval's
`EvalClient`/`AsyncEvalClient` and scripts that call `POST /evaluate` work unchanged. Every
route asks the gateway over NATS through `AsyncClient`; nothing is kept here. evalq's extra
fields ride along where the shapes allow it (extra keys in a response; `labels`, `pool`,
`shards`, `timeout` in a request). The differences are listed in README ("Coming from
lmms-eval's server") and docs/DESIGN.md.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import msgspec

from .errors import ConnectError, EvalqError, InvalidField, JobNotFound, RequestError, Timeout, WrongState
from .fields import JOB_ID
from .schemas import EvaluateRequest, JobInfo, decode, error_path, format_args
from .webguard import artifact_response

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute

    from .publisher import AsyncClient

__all__ = ["body_location", "lmms_eval_routes", "lmms_job"]

_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_FIELD_NAMED = re.compile(r"(missing required field|unknown field) `([^`]+)`")
_BYTE = re.compile(r"\(byte (\d+)\)")


def body_location(path: str | None, message: str = "") -> list[str | int]:
    """FastAPI's `loc` for evalq's JSON path: `$.tasks[0]` -> `["body", "tasks", 0]`.

    msgspec names a missing or unknown field in the message, at the object's path; FastAPI
    puts it in the location, so it is moved there.
    """
    loc: list[str | int] = ["body"]
    for key, index in _STEP.findall((path or "$")[1:]):
        loc.append(int(index) if index else key)
    named = _FIELD_NAMED.search(message)
    if named:
        loc.append(named.group(2))
    return loc


def _error_type(message: str) -> str:
    if "missing required field" in message:
        return "missing"
    if "unknown field" in message:
        return "extra_forbidden"
    return "value_error"


def _validation(loc: list[str | int], message: str, kind: str) -> dict[str, Any]:
    return {"detail": [{"type": kind, "loc": loc, "msg": message}]}


def _bad_body(exc: msgspec.DecodeError) -> Response:
    """lmms-eval's 422 for a body the gateway's decoder refuses, with FastAPI's types and places.

    The same decoder as the gateway's, so the API refuses exactly what the NATS subject does:
    JSON's non-finite numbers, numbers out of range, lone surrogates, invalid UTF-8.
    """
    message, path = error_path(exc)
    if not isinstance(exc, msgspec.ValidationError):
        # Not JSON: FastAPI places it at the byte where its parser stopped.
        at = _BYTE.search(message)
        loc: list[str | int] = ["body", int(at.group(1)) if at else 0]
        return _json(_validation(loc, f"JSON decode error: {message}", "json_invalid"), 422)
    if path == "$" and message.startswith("Expected `object`"):
        return _json(_validation(["body"], "Input should be a valid dictionary", "model_attributes_type"), 422)
    return _json(_validation(body_location(path, message), message, _error_type(message)), 422)


def _json(content: Any, status: int = 200) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status)


def _refusal(exc: EvalqError, job_id: str | None = None) -> Response:
    """lmms-eval's answer for an evalq error: 422 with `loc`, 404/400 with a `detail` string."""
    if isinstance(exc, InvalidField):
        return _json(_validation(body_location(exc.path, exc.message), exc.message, _error_type(exc.message)), 422)
    if isinstance(exc, JobNotFound):
        return _json({"detail": f"Job {job_id} not found"}, 404)
    if isinstance(exc, WrongState):
        return _json({"detail": f"Job already finished or cancelled: {exc.message}"}, 400)
    if isinstance(exc, RequestError):
        return _json({"detail": exc.message}, exc.code)
    if isinstance(exc, (Timeout, ConnectError)):
        return _json({"detail": str(exc)}, 503)
    return _json({"detail": str(exc)}, 502)


def _lmms_status(status: str) -> str:
    # lmms-eval has no `cancelling`: the job still runs until its worker has stopped it.
    return "running" if status == "cancelling" else status


def _args_dict(args: str) -> dict[str, str]:
    pairs = (item.partition("=") for item in args.split(",") if item)
    return {key: value for key, _, value in pairs}


def _lmms_request(request: EvaluateRequest | None) -> dict[str, Any]:
    """evalq's request in lmms-eval's shape: `model_args` a dict, `gen_kwargs` a `k=v` string."""
    if request is None:
        return {"model": "", "tasks": []}
    body: dict[str, Any] = msgspec.to_builtins(request)
    if isinstance(request.model_args, str):
        body["model_args"] = _args_dict(request.model_args)
    if isinstance(request.gen_kwargs, dict):
        body["gen_kwargs"] = format_args(request.gen_kwargs)
    return body


def lmms_job(info: JobInfo, base_url: str) -> dict[str, Any]:
    """lmms-eval's `JobInfo` for evalq's; `result` holds the metrics and the artifacts' URLs."""
    body: dict[str, Any] = msgspec.to_builtins(info)
    body["status"] = _lmms_status(info.status)
    body["evalq_status"] = info.status
    body["request"] = _lmms_request(info.request)
    body["result"] = None
    if info.status == "completed" and info.result is not None:
        prefix = f"{info.job_id}/"
        files = [name[len(prefix) :] for name in info.result.artifacts if name.startswith(prefix)]
        base = f"{base_url.rstrip('/')}/jobs/{info.job_id}/files/"
        model = info.request.model if info.request else "model"
        body["result"] = {
            "metrics": info.result.metrics,
            model: {
                "results": base + "results.json" if "results.json" in files else None,
                "samples": [base + quote(name) for name in files if name.startswith("samples/")],
            },
        }
    return body


def lmms_eval_routes(client: AsyncClient, base_url: str) -> list[BaseRoute]:
    """The routes; result URLs are built on `base_url` (the configured public URL), never on the
    request's Host, which whoever sends the request chooses."""
    from starlette.routing import Route

    async def health(request: Request) -> Response:
        try:
            state = await client.health()
        except EvalqError as exc:
            return _json({"status": "unhealthy", "detail": str(exc)}, 503)
        return _json(
            {
                "status": state.status,
                "timestamp": state.timestamp,
                "queue_size": state.queue_size,
                "version": state.version,
                "pools": state.pools,
                "workers": len(state.workers),
            }
        )

    async def evaluate(request: Request) -> Response:
        limit = client.settings.gateway.max_request_bytes
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _json({"detail": f"Request body over {limit} bytes"}, 413)
        try:
            job = decode(bytes(body), EvaluateRequest)
        except msgspec.DecodeError as exc:
            return _bad_body(exc)
        try:
            accepted = await client.submit(job, idempotency_key=request.headers.get("idempotency-key"))
        except EvalqError as exc:
            return _refusal(exc)
        position = accepted.position_in_queue or 0
        return _json(
            {
                "job_id": accepted.job_id,
                "status": _lmms_status(accepted.status),
                "position_in_queue": position,
                "message": f"Job queued successfully. Position in queue: {position}"
                if not accepted.duplicate
                else accepted.message,
                "duplicate": accepted.duplicate,
            }
        )

    async def get_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not JOB_ID.fullmatch(job_id):
            return _json({"detail": f"Job {job_id} not found"}, 404)
        try:
            info = await client.get_job(job_id)
        except EvalqError as exc:
            return _refusal(exc, job_id)
        return _json(lmms_job(info, base_url))

    async def cancel_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if not JOB_ID.fullmatch(job_id):
            return _json({"detail": f"Job {job_id} not found"}, 404)
        try:
            reply = await client.cancel_job(job_id)
        except EvalqError as exc:
            return _refusal(exc, job_id)
        message = f"Job {job_id} cancelled" if reply.status == "cancelled" else f"Job {job_id}: {reply.message}"
        return _json({"message": message, "status": _lmms_status(reply.status), "evalq_status": reply.status})

    async def job_file(request: Request) -> Response:
        job_id, name = request.path_params["job_id"], request.path_params["name"]
        missing = _json({"detail": f"No file {name} for job {job_id}"}, 404)
        if not JOB_ID.fullmatch(job_id):
            return missing
        try:
            info = await client.get_job(job_id)
            named = info.result.artifacts if info.result else []
            if f"{job_id}/{name}" not in {*named, f"{job_id}/results.json", f"{job_id}/eval.log"}:
                return missing
            artifact = await client.artifact(job_id, name)
        except EvalqError as exc:
            return _refusal(exc, job_id)
        if artifact is None:
            return missing
        return artifact_response(artifact)

    async def queue(request: Request) -> Response:
        try:
            state = await client.queue()
        except EvalqError as exc:
            return _refusal(exc)
        queued = [job for jobs in state.queued_jobs.values() for job in jobs]
        return _json(
            {
                "queue_size": state.queue_size,
                "running_job": state.running_jobs[0] if state.running_jobs else None,
                "queued_jobs": queued,
                "completed_jobs": state.completed_jobs,
                "failed_jobs": state.failed_jobs,
                "running_jobs": state.running_jobs,
                "cancelled_jobs": state.cancelled_jobs,
                "queued_by_pool": state.queued_jobs,
                "workers": len(state.workers),
            }
        )

    async def tasks(request: Request) -> Response:
        # lmms-eval answers 200 with an empty list and `error` when it cannot list them.
        try:
            return _json({"tasks": await client.list_tasks()})
        except EvalqError as exc:
            return _json({"tasks": [], "error": str(exc)})

    async def models(request: Request) -> Response:
        try:
            return _json({"models": await client.list_models()})
        except EvalqError as exc:
            return _json({"models": [], "error": str(exc)})

    return [
        Route("/health", health, methods=["GET"]),
        Route("/evaluate", evaluate, methods=["POST"]),
        Route("/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/jobs/{job_id}", cancel_job, methods=["DELETE"]),
        Route("/jobs/{job_id}/files/{name:path}", job_file, methods=["GET"]),
        Route("/queue", queue, methods=["GET"]),
        Route("/tasks", tasks, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
    ]
