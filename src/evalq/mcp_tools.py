"""`evalq mcp`: lmms-eval's MCP tools (`lmms_eval/mcp/tools.py`, 0.7.3) over evalq.

The same tool names, arguments and answer shapes, so an agent written for lmms-eval's MCP
server works unchanged, but every run is an evalq job: durable (a restart of the queue or of
this server loses none), authenticated by NATS, sharded, cached. evalq adds `list_jobs`,
`compare_runs` and `get_verdict`. Over stdio, or streamable HTTP (off loopback only with the
web process's token). docs/DESIGN.md, "For agents".
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from mcp.server.fastmcp import FastMCP

from .config import Settings
from .errors import EvalqError, JobNotFound
from .gates import parse_samples, samples_task
from .publisher import AsyncClient
from .schemas import JobInfo

__all__ = ["create_server"]

_TERMINAL = ("completed", "failed", "cancelled")


def _status(info: JobInfo) -> str:
    return "running" if info.status == "cancelling" else info.status  # lmms-eval has no cancelling


def _results(info: JobInfo) -> dict[str, Any] | None:
    """lmms-eval's `results`: the model's name -> its results section."""
    if info.result is None:
        return None
    model = info.request.model if info.request else "model"
    return {model: {"results": info.result.metrics}}


def create_server(settings: Settings, **options: Any) -> FastMCP:
    """The MCP server; it connects to the queue when a session starts (`options` go to FastMCP:
    host, port, ...)."""
    held: dict[str, Any] = {"sessions": 0}
    opening = asyncio.Lock()

    # FastMCP runs its lifespan once per session (each HTTP session, the one stdio session):
    # the sessions share one connection to the queue, closed with the last of them.
    @contextlib.asynccontextmanager
    async def lifespan(_: FastMCP) -> AsyncIterator[None]:
        async with opening:
            if held["sessions"] == 0:
                held["client"] = await AsyncClient(settings).connect()
            held["sessions"] += 1
        try:
            yield
        finally:
            async with opening:
                held["sessions"] -= 1
                if held["sessions"] == 0:
                    await held.pop("client").close()

    server = FastMCP(
        "evalq",
        instructions=(
            "evalq: lmms-eval evaluations as durable jobs on a shared GPU queue.\n"
            "Tools: list_tasks / get_task_info, list_models / get_model_info, evaluate, "
            "get_run_status / get_run_result, cancel_run (as lmms-eval's), and list_jobs, "
            "compare_runs, get_verdict."
        ),
        json_response=True,
        lifespan=lifespan,
        **options,
    )

    def client() -> AsyncClient:
        found: AsyncClient = held["client"]
        return found

    @server.tool()
    async def list_tasks(query: str | None = None) -> dict[str, Any]:
        """List the evaluation tasks the queue's workers offer.

        Args:
            query: Optional filter string to match task names (glob-style with *).
        """
        names = [n for n in await client().list_tasks() if not query or fnmatch.fnmatch(n, query)]
        tasks = [{"name": n, "type": "task", "yaml_path": None, "output_type": None} for n in names]
        return {"tasks": tasks, "total": len(tasks), "query": query}

    @server.tool()
    async def get_task_info(task_name: str) -> dict[str, Any]:
        """Get information about a task: whether the queue's workers offer it.

        Args:
            task_name: Name of the task to look up.
        """
        if task_name not in await client().list_tasks():
            raise ValueError(f"Task '{task_name}' not found. Use list_tasks() to see available tasks.")
        return {"name": task_name, "type": "task"}

    @server.tool()
    async def list_models(include_aliases: bool = False) -> dict[str, Any]:
        """List the model backends the queue's workers offer.

        Args:
            include_aliases: Accepted for compatibility; evalq lists the names workers accept.
        """
        models = [
            {"model_id": m, "has_chat": False, "has_simple": True, "aliases": []} for m in await client().list_models()
        ]
        return {"models": models, "total": len(models)}

    @server.tool()
    async def get_model_info(model_name: str) -> dict[str, Any]:
        """Get information about a model backend: whether the queue's workers offer it.

        Args:
            model_name: Model name to look up.
        """
        if model_name not in await client().list_models():
            raise ValueError(f"Model '{model_name}' is not offered by any worker")
        return {"model_id": model_name, "has_chat": False, "has_simple": True, "aliases": []}

    @server.tool()
    async def evaluate(
        model: str,
        tasks: list[str],
        model_args: dict[str, Any] | None = None,
        batch_size: int | None = None,
        limit: int | None = None,
        num_fewshot: int | None = None,
        gen_kwargs: str | None = None,
        log_samples: bool = True,
        num_gpus: int = 1,
        mode: str = "auto",
        wait_timeout_s: int = 90,
        labels: dict[str, str] | None = None,
        pool: str = "default",
    ) -> dict[str, Any]:
        """Run a model evaluation on tasks, as a durable evalq job.

        Args:
            model: Model backend name (e.g. "qwen2_5_vl", "dummy").
            tasks: List of task names to evaluate.
            model_args: Model-specific arguments as a dict.
            batch_size: Batch size for evaluation.
            limit: Limit the number of examples per task.
            num_fewshot: Number of few-shot examples.
            gen_kwargs: Generation kwargs as a k=v,k=v string.
            log_samples: Whether to log individual sample results.
            num_gpus: Number of GPUs to use.
            mode: "auto" (wait up to wait_timeout_s, then return run_id), "async" (return run_id at once), "sync".
            wait_timeout_s: For mode="auto", how long to wait before returning a run_id.
            labels: evalq labels (e.g. {"run": "r1", "step": "200"}).
            pool: evalq worker pool.
        """
        if mode not in {"auto", "async", "sync"}:
            raise ValueError("mode must be one of: auto, async, sync")
        fields = {
            "model_args": model_args,
            "batch_size": batch_size,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "gen_kwargs": gen_kwargs,
        }
        body = {"model": model, "tasks": tasks, "log_samples": log_samples, "num_gpus": num_gpus, "pool": pool}
        body.update({k: v for k, v in fields.items() if v is not None})
        if labels:
            body["labels"] = labels
        accepted = await client().submit(body)
        submitted = {
            "run_id": accepted.job_id,
            "status": "queued",
            "position_in_queue": accepted.position_in_queue,
            "message": f"Job queued at position {accepted.position_in_queue}. "
            f"Use get_run_status('{accepted.job_id}') to check progress.",
        }
        if mode == "async":
            return submitted
        try:
            async with asyncio.timeout(None if mode == "sync" else wait_timeout_s):
                info = await _ended(accepted.job_id)
        except TimeoutError:
            info = await client().get_job(accepted.job_id)
            return {**submitted, "status": _status(info), "message": f"Job still {_status(info)}: use get_run_status."}
        return {"run_id": info.job_id, "status": info.status, "results": _results(info), "error": info.error}

    async def _ended(job_id: str) -> JobInfo:
        with contextlib.suppress(EvalqError):
            return await client().wait_for_job(job_id)
        return await client().get_job(job_id)

    @server.tool()
    async def get_run_status(run_id: str) -> dict[str, Any]:
        """Get the status of an evaluation run.

        Args:
            run_id: The run ID returned by the evaluate tool (any unique start of it).
        """
        info = await _job(run_id)
        return {
            "run_id": info.job_id,
            "status": _status(info),
            "created_at": info.created_at,
            "started_at": info.started_at,
            "completed_at": info.completed_at,
            "position_in_queue": info.position_in_queue,
            "error": info.error,
        }

    async def _job(run_id: str) -> JobInfo:
        try:
            return await client().get_job(await client().resolve(run_id))
        except JobNotFound:
            raise ValueError(f"Run '{run_id}' not found.") from None

    @server.tool()
    async def get_run_result(
        run_id: str, include_samples: bool = False, sample_limit: int = 100, sample_offset: int = 0
    ) -> dict[str, Any]:
        """Get the results of a completed evaluation run.

        Args:
            run_id: The run ID returned by the evaluate tool.
            include_samples: Whether to include per-sample details (can be large).
            sample_limit: Maximum number of samples to include (default: 100).
            sample_offset: Offset for sample pagination (default: 0).
        """
        if sample_offset < 0 or sample_limit < 0:
            raise ValueError("sample_offset and sample_limit must be >= 0")
        info = await _job(run_id)
        if info.status != "completed":
            return {
                "run_id": info.job_id,
                "status": _status(info),
                "results": None,
                "error": info.error or (f"Run is not completed yet. Status: {_status(info)}"),
            }
        results = _results(info) or {}
        if include_samples and info.result is not None:
            rows: list[dict[str, Any]] = []
            for name in info.result.artifacts:
                if samples_task(name) is None:
                    continue
                artifact = await client().artifact(info.job_id, name[len(info.job_id) + 1 :])
                if artifact is None or artifact.size > 256 << 20:
                    continue
                data = b"".join([chunk async for chunk in artifact.chunks()])
                rows += parse_samples(data.decode(errors="replace").splitlines()).values()
            for section in results.values():
                section["samples"] = rows[sample_offset : sample_offset + sample_limit]
        return {"run_id": info.job_id, "status": "completed", "results": results, "error": None}

    @server.tool()
    async def cancel_run(run_id: str) -> dict[str, Any]:
        """Cancel an evaluation run (a running one is stopped, too).

        Args:
            run_id: The run ID to cancel.
        """
        info = await _job(run_id)
        try:
            reply = await client().cancel_job(info.job_id)
        except EvalqError as exc:
            return {"success": False, "run_id": info.job_id, "message": str(exc)}
        return {"success": True, "run_id": info.job_id, "message": reply.message}

    @server.tool()
    async def list_jobs(
        status: list[str] | None = None, labels: dict[str, str] | None = None, pool: str | None = None, limit: int = 20
    ) -> dict[str, Any]:
        """evalq: the newest jobs matching filters, with their metrics and verdicts.

        Args:
            status: Any of queued, running, cancelling, completed, failed, cancelled.
            labels: Labels every job must carry (e.g. {"run": "r1"}).
            pool: Only this pool's jobs.
            limit: At most this many (1-1000).
        """
        page = await client().jobs(
            status=status, labels=labels, pool=pool, limit=max(1, min(limit, 1000)), metrics=["*"]
        )
        return json.loads(msgspec.json.encode(page))  # type: ignore[no-any-return]

    @server.tool()
    async def compare_runs(run_a: str, run_b: str) -> dict[str, Any]:
        """evalq: two runs' metrics side by side, with B's delta against A.

        Args:
            run_a: The baseline run.
            run_b: The run compared with it.
        """
        a, b = await _job(run_a), await _job(run_b)
        ours, theirs = (a.result.metrics if a.result else {}), (b.result.metrics if b.result else {})
        rows = []
        for task in sorted(ours.keys() | theirs.keys()):
            for key in sorted((ours.get(task) or {}).keys() | (theirs.get(task) or {}).keys()):
                x, y = (ours.get(task) or {}).get(key), (theirs.get(task) or {}).get(key)
                numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
                rows.append({"task": task, "metric": key, "a": x, "b": y, "delta": (y - x) if numeric else None})  # type: ignore[operator]
        return {"run_a": a.job_id, "run_b": b.job_id, "metrics": rows}

    @server.tool()
    async def get_verdict(run_id: str, policy: str | None = None, baseline: str | None = None) -> dict[str, Any]:
        """evalq: a completed run's gate verdict (GO, NO-GO, INCONCLUSIVE): its stored one, or under
        another stored policy or baseline ("previous", "best" or a run id).

        Args:
            run_id: The run to judge.
            policy: A stored gate policy's name (evalq gate set).
            baseline: "previous", "best" or a run id.
        """
        info = await _job(run_id)
        verdict = await client().gates.check(info.job_id, policy=policy, baseline=baseline)
        return json.loads(msgspec.json.encode(verdict))  # type: ignore[no-any-return]

    return server
