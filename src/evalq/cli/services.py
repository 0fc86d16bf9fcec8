"""The commands that run a part of the queue in the foreground: server, gateway, worker, up, ui.

Each says once on stderr that it is ready (with `--json`: one object on stdout, for a
script that waits for it), then runs until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config import Settings
from ..embedded import EmbeddedServer
from ..errors import EvalqError
from ..extras import install_command, missing_modules
from ..web import check_exposure
from .app import JsonOpt, need_extras, run, settings
from .output import console, dump, errors, fail, say_ready, shown
from .processes import on_signals, run_gateway, run_mcp, run_ui, run_up, run_worker

__all__ = ["gateway", "mcp", "server", "ui", "up", "worker"]

TaskPathOpt = Annotated[Optional[list[str]], typer.Option(help="An extra lmms-eval task folder (repeatable).")]
MetricsPortOpt = Annotated[
    Optional[int],
    typer.Option(help="Serve Prometheus /metrics, /healthz and /readyz on this port [env EVALQ_METRICS_PORT]."),
]


def server(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Client port on 127.0.0.1.")] = 4222,
    store_dir: Annotated[Optional[Path], typer.Option(help="JetStream store (default $EVALQ_HOME/nats).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Run the embedded nats-server (JetStream, 127.0.0.1) in the foreground.

    Example: `evalq server --port 4222`
    """
    need_extras("server")
    embedded = EmbeddedServer(store_dir or settings(ctx).home_path / "nats", port=port)

    async def main() -> None:
        async with embedded:
            stop = asyncio.Event()
            # Before the ready line: whoever reads it may stop the server at once.
            remove = on_signals(stop.set)
            try:
                if json_:
                    dump({"url": embedded.url, "store": str(embedded.store_dir)})
                else:
                    console.print(
                        shown(f"nats-server listening on {embedded.url} (store {embedded.store_dir}); Ctrl-C stops it")
                    )
                await stop.wait()
            finally:
                remove()

    run(main())


def gateway(ctx: typer.Context, metrics_port: MetricsPortOpt = None, json_: JsonOpt = False) -> None:
    """Run the gateway service (validates, enqueues, answers status/cancel/queue).

    Example: `EVALQ_NATS_URL=nats://10.0.0.5:4222 evalq gateway --metrics-port 9464`
    """
    chosen = settings(ctx, metrics_port=metrics_port)
    prefix, urls = chosen.queue.prefix, chosen.connection.nats_url

    def ready() -> None:
        say_ready(json_, {"prefix": prefix, "nats_url": urls}, f"gateway serving {prefix}.* on {', '.join(urls)}")

    run(run_gateway(chosen, ready=ready))


def worker(
    ctx: typer.Context,
    pool: Annotated[Optional[str], typer.Option(help="The pool to serve [env EVALQ_POOL].")] = None,
    task_path: TaskPathOpt = None,
    grace: Annotated[Optional[float], typer.Option(help="Seconds to finish the current job on SIGTERM.")] = None,
    shutdown_mode: Annotated[
        Optional[str], typer.Option(help="'finish' (within --grace) or 'requeue' (at once).")
    ] = None,
    max_attempts: Annotated[Optional[int], typer.Option(help="Starts before a job is failed.")] = None,
    worker_id: Annotated[Optional[str], typer.Option(help="A stable id (default host-pid-random).")] = None,
    warm: Annotated[
        Optional[bool],
        typer.Option(
            "--warm/--no-warm",
            help="Fork single-GPU jobs from a process with lmms-eval already imported [env EVALQ_WARM_EVALUATOR].",
        ),
    ] = None,
    resident_model: Annotated[
        Optional[bool],
        typer.Option(
            "--resident-model/--no-resident-model",
            help="Keep the last job's model loaded for the next job with the same model [env EVALQ_RESIDENT_MODEL].",
        ),
    ] = None,
    resident_idle: Annotated[
        Optional[float], typer.Option(help="Release a resident model idle this many seconds (default: never).")
    ] = None,
    metrics_port: MetricsPortOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run a worker: take jobs of one pool, one at a time, and run lmms-eval.

    Example: `CUDA_VISIBLE_DEVICES=0 evalq worker --pool default --task-path ./my_tasks`
    """
    need_extras("worker")
    chosen = settings(
        ctx,
        pool=pool,
        task_paths=task_path or None,
        grace=grace,
        shutdown_mode=shutdown_mode,
        max_attempts=max_attempts,
        worker_id=worker_id,
        warm_evaluator=warm,
        resident_model=resident_model,
        resident_idle=resident_idle,
        metrics_port=metrics_port,
    )
    serving = chosen.worker.pool

    def ready(worker_id: str) -> None:
        say_ready(json_, {"worker_id": worker_id, "pool": serving}, f"worker serving pool {serving}")

    run(run_worker(chosen, ready=ready))


def up(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port for the embedded nats-server on 127.0.0.1.")] = 4222,
    task_path: TaskPathOpt = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Run the web process too (see `evalq ui`).")] = True,
    ui_port: Annotated[
        Optional[int], typer.Option(help="The web process's port (a free one if it is in use) [env EVALQ_UI_PORT].")
    ] = None,
    lmms_eval_api: Annotated[
        bool,
        typer.Option("--lmms-eval-api/--no-lmms-eval-api", help="Serve lmms-eval's server API from the web process."),
    ] = True,
    metrics_port: MetricsPortOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run everything for one machine in one process: nats-server, a gateway, a worker and the web process.

    Example: `evalq up` then, in another shell, `evalq submit --model dummy --tasks evalq_demo --wait`,
    or `EvalClient("http://127.0.0.1:8642").evaluate(model="dummy", tasks=["evalq_demo"])`
    """
    need_extras("up")
    chosen = settings(
        ctx, task_paths=task_path or None, ui_port=ui_port, lmms_eval_api=lmms_eval_api, metrics_port=metrics_port
    )
    if ui:
        _check_exposure(chosen)
    lacking = missing_modules("ui") if ui else []
    if lacking:
        errors.print(
            shown(f"evalq up: no web process: it needs {' and '.join(lacking)}: {install_command('ui')}"),
            soft_wrap=True,
        )
    api_on = chosen.ui.lmms_eval_api
    api = " (lmms-eval API on)" if api_on else ""
    started: dict[str, Any] = {"ui_url": None}

    def web_ready(url: str) -> None:
        started["ui_url"] = url
        if not json_:
            errors.print(shown(f"evalq ui: {url}{api}"), soft_wrap=True)

    def ready(url: str) -> None:
        # The web process is up before this: one object says everything a script needs.
        ready_obj = {"nats_url": url, **started, "lmms_eval_api": api_on and started["ui_url"] is not None}
        say_ready(json_, ready_obj, f"evalq up: {url} (gateway + worker); Ctrl-C stops")

    run(run_up(chosen, port=port, ready=ready, web_ready=web_ready, web=ui and not lacking))


def _check_exposure(chosen: Settings) -> None:
    """A web process off loopback without a token is a usage error: exit 2 before anything starts."""
    try:
        check_exposure(chosen.ui)
    except EvalqError as exc:
        raise fail(str(exc), 2) from None


def ui(
    ctx: typer.Context,
    host: Annotated[
        Optional[str], typer.Option(help="Address to bind; off loopback a token is required [env EVALQ_UI_HOST].")
    ] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8642) [env EVALQ_UI_PORT].")] = None,
    ui_token: Annotated[
        Optional[str],
        typer.Option(
            "--token",
            help="Require this token (Bearer, or Basic's password: http://user:TOKEN@host:port) [env EVALQ_UI_TOKEN].",
        ),
    ] = None,
    lmms_eval_api: Annotated[
        Optional[bool],
        typer.Option(
            "--lmms-eval-api/--no-lmms-eval-api",
            help="Serve lmms-eval's server API, which submits and cancels [env EVALQ_LMMS_EVAL_API].",
        ),
    ] = None,
    allow_cancel: Annotated[
        Optional[bool],
        typer.Option(
            "--allow-cancel/--no-allow-cancel",
            help="Show a cancel button on the dashboard's job pages [env EVALQ_UI_ALLOW_CANCEL].",
        ),
    ] = None,
    metrics_port: MetricsPortOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run the web process: the dashboard (queue, jobs, trends, compare), and lmms-eval's server API with
    --lmms-eval-api; read-only unless --lmms-eval-api or --allow-cancel.

    Example: `evalq --nats-url nats://10.0.0.5:4222 ui --host 0.0.0.0 --token $TOKEN --lmms-eval-api`
    """
    need_extras("ui")
    # `--token` at the top level is NATS's; this one is the web process's own.
    chosen = settings(
        ctx,
        ui_host=host,
        ui_port=port,
        ui_token=ui_token,
        lmms_eval_api=lmms_eval_api,
        ui_allow_cancel=allow_cancel,
        metrics_port=metrics_port,
    )
    _check_exposure(chosen)
    api_on = chosen.ui.lmms_eval_api
    api = " (lmms-eval API on)" if api_on else ""

    def ready(url: str) -> None:
        say_ready(json_, {"url": url, "lmms_eval_api": api_on}, f"evalq ui: {url}{api}; Ctrl-C stops", soft_wrap=True)

    run(run_ui(chosen, ready=ready))


def mcp(
    ctx: typer.Context,
    transport: Annotated[str, typer.Option(help="stdio (an agent starts it) or http (streamable HTTP).")] = "stdio",
    host: Annotated[str, typer.Option(help="With http: the address to bind; off loopback --token is required.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="With http: the port.")] = 8765,
    token: Annotated[
        Optional[str], typer.Option("--mcp-token", help="With http: require this token (Bearer) [env EVALQ_MCP_TOKEN].")
    ] = None,
) -> None:
    """Serve lmms-eval's MCP tools (list_tasks, evaluate, get_run_status, get_run_result, cancel_run, ...)
    over this queue: every run a durable evalq job. Plus list_jobs, compare_runs and get_verdict.

    Example, an agent's MCP config: `{"command": "evalq", "args": ["mcp"], "env": {"EVALQ_NATS_URL": "nats://10.0.0.5:4222"}}`

    Example: `evalq mcp --transport http --port 8765`
    """
    need_extras("mcp")
    if transport not in ("stdio", "http"):
        raise fail(f"--transport is stdio or http, not {transport!r}", 2)
    chosen = settings(ctx)
    secret = token or os.environ.get("EVALQ_MCP_TOKEN") or None
    run(run_mcp(chosen, transport, host, port, secret))
