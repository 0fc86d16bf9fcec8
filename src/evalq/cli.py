"""The `evalq` command: run the services, submit and follow jobs.

Every command has `--help` with an example and `--json` for scripts. Errors are one
line on stderr, never a traceback. Exit codes: 0 ok (a watched job completed), 1 error
or a failed job, 2 usage, 3 a cancelled job, 4 a timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .config import Settings, load_settings
from .errors import EvalqError, JobCancelled, JobFailed
from .publisher import AsyncClient
from .schemas import (
    Cancelled,
    Completed,
    Event,
    Failed,
    Health,
    JobInfo,
    ProgressEvent,
    Queued,
    Requeued,
    ShardCompleted,
    ShardFailed,
    ShardStarted,
    Started,
)

app = typer.Typer(
    name="evalq",
    help="A durable job queue for lmms-eval evaluations over NATS JetStream.\n\n"
    "Quick start:  evalq up  (in one terminal), then\n\n"
    "  evalq submit --model dummy --tasks evalq_demo --wait",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console()
errors = Console(stderr=True)

EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMEOUT = 1, 3, 4
# Tables show a job id's first 8 characters, as git and docker show short ids.
SHORT_ID = 8

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (one object, or JSON lines) for scripts.")]


def _settings(ctx: typer.Context, **flags: Any) -> Settings:
    base: dict[str, Any] = dict(ctx.obj or {})
    config = base.pop("config", None)
    base.update(flags)
    return load_settings(base, config=config)


def _dump(obj: Any) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()


# C0, DEL and C1: a terminal acts on them (ESC starts a sequence, CR rewrites the line).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _plain(text: object, *, lines: bool = False) -> str:
    """`text` with each control character written as a `\\xNN` escape; `lines` keeps newlines."""
    parts = str(text).split("\n") if lines else [str(text)]
    return "\n".join(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", part) for part in parts)


def _shown(text: object, *, lines: bool = False) -> str:
    """Text from the network or a file, safe to print through rich.

    Job output, errors, labels, names and paths come from other processes: a control
    character could forge a line or reach the terminal, and `[...]` would be read as rich
    markup. With `lines`, newlines are kept, for a log tail printed as lines on purpose.
    """
    return "\n".join(escape(line) for line in _plain(text, lines=lines).split("\n"))


class _PlainFormatter(logging.Formatter):
    """Log lines with control characters escaped: a message may quote a request or a job's output."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _plain(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _plain(super().formatException(ei), lines=True)

    def formatStack(self, stack_info: str) -> str:
        return _plain(super().formatStack(stack_info), lines=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {_shown(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _need_extras(command: str) -> None:
    """Exit 2 with the `pip install` line when this install lacks what `command` runs, before anything else."""
    from .extras import missing_for

    missing = missing_for(command)
    if missing:
        raise _fail(missing, 2)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; turn evalq's errors into one line and an exit code."""
    try:
        return asyncio.run(coro)
    except JobFailed as exc:
        raise _fail(str(exc), EXIT_FAILED) from None
    except JobCancelled as exc:
        raise _fail(str(exc), EXIT_CANCELLED) from None
    except TimeoutError as exc:
        # evalq's Timeout says what did not answer; a bare one is the command's own --timeout.
        raise _fail(str(exc) if isinstance(exc, EvalqError) else "timed out", EXIT_TIMEOUT) from None
    except EvalqError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except OSError as exc:
        raise _fail(str(exc)) from None


def _client_command(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run `fn(client, ...)` with a connected AsyncClient built from the global options."""

    @wraps(fn)
    def wrapper(ctx: typer.Context, *args: Any, **kwargs: Any) -> Any:
        settings = _settings(ctx)

        async def main() -> Any:
            async with AsyncClient(settings) as client:
                return await fn(client, *args, **kwargs)

        return _run(main())

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        console.print(f"evalq {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    nats_url: Annotated[
        Optional[str], typer.Option(help="NATS server URL(s), comma-separated [env EVALQ_NATS_URL].")
    ] = None,
    prefix: Annotated[Optional[str], typer.Option(help="Subject prefix [env EVALQ_PREFIX].")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A TOML settings file with an [evalq] table.")] = None,
    creds: Annotated[Optional[str], typer.Option(help="NATS .creds file.")] = None,
    user: Annotated[Optional[str], typer.Option(help="NATS user.")] = None,
    password: Annotated[Optional[str], typer.Option(help="NATS password.")] = None,
    token: Annotated[Optional[str], typer.Option(help="NATS token.")] = None,
    nkey_seed: Annotated[Optional[str], typer.Option(help="NATS nkey seed file.")] = None,
    tls_ca: Annotated[Optional[str], typer.Option(help="TLS CA file.")] = None,
    tls_cert: Annotated[Optional[str], typer.Option(help="TLS client certificate.")] = None,
    tls_key: Annotated[Optional[str], typer.Option(help="TLS client key.")] = None,
    home: Annotated[Optional[str], typer.Option(help="Local state folder [env EVALQ_HOME].")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
    version: Annotated[
        bool,
        # Eager, so it answers before the check that a command was given.
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Global options come before the command: `evalq --nats-url nats://host:4222 queue`."""
    handler = logging.StreamHandler()
    handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    ctx.obj = {
        "nats_url": nats_url.split(",") if nats_url else None,
        "prefix": prefix,
        "config": config,
        "creds": creds,
        "user": user,
        "password": password,
        "token": token,
        "nkey_seed": nkey_seed,
        "tls_ca": tls_ca,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "home": home,
    }


# --- services -------------------------------------------------------------------------


@app.command()
def server(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Client port on 127.0.0.1.")] = 4222,
    store_dir: Annotated[Optional[Path], typer.Option(help="JetStream store (default $EVALQ_HOME/nats).")] = None,
) -> None:
    """Run the embedded nats-server (JetStream, 127.0.0.1) in the foreground.

    Example: `evalq server --port 4222`
    """
    _need_extras("server")
    from .embedded import EmbeddedServer
    from .processes import on_signals

    settings = _settings(ctx)
    embedded = EmbeddedServer(store_dir or settings.home_path / "nats", port=port)

    async def main() -> None:
        async with embedded:
            console.print(
                _shown(f"nats-server listening on {embedded.url} (store {embedded.store_dir}); Ctrl-C stops it")
            )
            stop = asyncio.Event()
            remove = on_signals(stop.set)
            try:
                await stop.wait()
            finally:
                remove()

    _run(main())


@app.command()
def setup(
    ctx: typer.Context,
    pool: Annotated[list[str], typer.Option(help="A pool to create or update (repeat it); default: `default`.")] = [],  # noqa: B006
    ack_wait: Annotated[Optional[float], typer.Option(help="Seconds before a silent job is redelivered.")] = None,
    replicas: Annotated[Optional[int], typer.Option(help="JetStream replicas for every stream and bucket.")] = None,
    queue_limit: Annotated[Optional[int], typer.Option(help="Jobs a pool holds.")] = None,
    trust_remote_code: Annotated[
        Optional[bool],
        typer.Option(
            "--trust-remote-code/--no-trust-remote-code",
            help="Policy: whether requests may set trust_remote_code for any model they may name "
            "(without it, only for a model named by a local path under a model root).",
        ),
    ] = None,
    model_root: Annotated[
        list[str],
        typer.Option(help="Policy: an absolute folder under which requests may name local models (repeat it)."),
    ] = [],  # noqa: B006
    hub_prefix: Annotated[
        list[str],
        typer.Option(
            help="Policy: hub ids requests may name: an organisation (`my-org`), a prefix with a `/`, "
            "or `*` for any (repeat it)."
        ),
    ] = [],  # noqa: B006
    default_timeout: Annotated[
        Optional[int], typer.Option(help="Policy: seconds a job without its own timeout may run (0: no limit).")
    ] = None,
    max_timeout: Annotated[
        Optional[int], typer.Option(help="Policy: the largest timeout a job may have, in seconds (0: no limit).")
    ] = None,
    reset_policy: Annotated[
        bool, typer.Option("--reset-policy", help="Policy: start from the default instead of the pool's current one.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what differs.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create the queue's JetStream objects, or apply these queue settings and pool policies to them.

    Every other process creates what is missing and leaves what exists as it is (a difference is
    logged); this command is how the queue's settings change on purpose.

    The policy options set what requests to each `--pool` may make its workers load and how long
    their jobs may run. A list option replaces the pool's list; options not given keep the pool's
    current values. A pool never set up refuses local paths, hub ids and trust_remote_code.

    Example: `evalq setup --ack-wait 30 --pool default --pool big`

    Example: `evalq setup --pool gpu --model-root /models --hub-prefix my-org --max-timeout 86400`
    """
    from . import policy as policies
    from .topology import Topology

    settings = _settings(ctx, ack_wait=ack_wait, replicas=replicas, queue_limit=queue_limit)
    pools = tuple(pool) or ("default",)
    changes: dict[str, Any] = {}
    if trust_remote_code is not None:
        changes["trust_remote_code"] = trust_remote_code
    for root in model_root:
        if not root.startswith("/"):
            raise typer.BadParameter(f"{root!r} is not an absolute path", param_hint="--model-root")
    if model_root:
        changes["model_roots"] = model_root
    if hub_prefix:
        changes["hub_prefixes"] = hub_prefix
    for name, seconds in (("default_timeout_s", default_timeout), ("max_timeout_s", max_timeout)):
        if seconds is not None:
            changes[name] = seconds or None
    try:
        # Checked before connecting, so a bad value changes nothing.
        policies.revised(policies.PoolPolicy(), **changes)
    except (msgspec.ValidationError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="the policy options") from None
    set_policy = bool(changes) or reset_policy

    async def main() -> list[dict[str, Any]]:
        from .connection import connect

        # The differences are this command's answer, not warnings.
        logging.getLogger("evalq.topology").setLevel(logging.ERROR)
        nc = await connect(settings, name="evalq-setup")
        try:
            js = nc.jetstream(timeout=settings.connection.request_timeout, domain=settings.connection.js_domain)
            topology = Topology.from_settings(settings)
            found = await topology.ensure(js, pools, update=False)
            if not dry_run and found:
                await topology.ensure(js, pools, update=True)
            differs = [{"object": d.object, "setting": d.setting, "was": d.current, "now": d.wanted} for d in found]
            for name in pools if set_policy else ():
                current = await policies.load_policy(js, topology, name)
                wanted = policies.revised(policies.PoolPolicy() if reset_policy else current, **changes)
                if wanted == current:
                    continue
                if not dry_run:
                    timeout = settings.connection.request_timeout
                    await policies.store_policy(nc, topology, name, wanted, timeout=timeout)
                was, now = msgspec.to_builtins(current), msgspec.to_builtins(wanted)
                differs.append({"object": f"pool {name}", "setting": "policy", "was": was, "now": now})
            return differs
        finally:
            await nc.close()

    differs = _run(main())
    if json_out:
        _dump(differs)
        return
    verb = "would change" if dry_run else "changed"
    lines = []
    for d in differs:
        if d["setting"] != "policy":
            lines.append(f"{d['object']}: {d['setting']} {verb} from {d['was']!r} to {d['now']!r}")
            continue
        # A policy is shown field by field: only what differs.
        for field, now in d["now"].items():
            if d["was"][field] != now:
                lines.append(f"{d['object']}: policy {field} {verb} from {d['was'][field]!r} to {now!r}")
    for line in lines:
        console.print(_shown(line), highlight=False, soft_wrap=True)
    if not differs:
        console.print(_shown(f"queue {settings.queue.prefix!r} is as configured (pools: {', '.join(pools)})"))


@app.command()
def gateway(ctx: typer.Context) -> None:
    """Run the gateway service (validates, enqueues, answers status/cancel/queue).

    Example: `EVALQ_NATS_URL=nats://10.0.0.5:4222 evalq gateway`
    """
    from .processes import run_gateway

    settings = _settings(ctx)
    _run(
        run_gateway(
            settings,
            ready=lambda: errors.print(
                _shown(f"gateway serving {settings.queue.prefix}.* on {', '.join(settings.connection.nats_url)}")
            ),
        )
    )


@app.command()
def worker(
    ctx: typer.Context,
    pool: Annotated[Optional[str], typer.Option(help="The pool to serve [env EVALQ_POOL].")] = None,
    task_path: Annotated[Optional[list[str]], typer.Option(help="An extra lmms-eval task folder (repeatable).")] = None,
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
) -> None:
    """Run a worker: take jobs of one pool, one at a time, and run lmms-eval.

    Example: `CUDA_VISIBLE_DEVICES=0 evalq worker --pool default --task-path ./my_tasks`
    """
    _need_extras("worker")
    from .processes import run_worker

    settings = _settings(
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
    )
    _run(run_worker(settings, ready=lambda: errors.print(_shown(f"worker serving pool {settings.worker.pool}"))))


@app.command()
def up(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port for the embedded nats-server on 127.0.0.1.")] = 4222,
    task_path: Annotated[Optional[list[str]], typer.Option(help="An extra lmms-eval task folder (repeatable).")] = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Run the web process too (see `evalq ui`).")] = True,
    ui_port: Annotated[
        Optional[int], typer.Option(help="The web process's port (a free one if it is in use) [env EVALQ_UI_PORT].")
    ] = None,
    lmms_eval_api: Annotated[
        bool,
        typer.Option("--lmms-eval-api/--no-lmms-eval-api", help="Serve lmms-eval's server API from the web process."),
    ] = True,
) -> None:
    """Run everything for one machine in one process: nats-server, a gateway, a worker and the web process.

    Example: `evalq up` then, in another shell, `evalq submit --model dummy --tasks evalq_demo --wait`,
    or `EvalClient("http://127.0.0.1:8642").evaluate(model="dummy", tasks=["evalq_demo"])`
    """
    _need_extras("up")
    from .extras import install_command, missing_modules
    from .processes import run_up

    settings = _settings(ctx, task_paths=task_path or None, ui_port=ui_port, lmms_eval_api=lmms_eval_api)
    if ui:
        _check_exposure(settings)
    lacking = missing_modules("ui") if ui else []
    if lacking:
        errors.print(
            _shown(f"evalq up: no web process: it needs {' and '.join(lacking)}: {install_command('ui')}"),
            soft_wrap=True,
        )
    api = " (lmms-eval API on)" if settings.ui.lmms_eval_api else ""
    _run(
        run_up(
            settings,
            port=port,
            ready=lambda url: errors.print(_shown(f"evalq up: {url} (gateway + worker); Ctrl-C stops")),
            web_ready=lambda url: errors.print(_shown(f"evalq ui: {url}{api}"), soft_wrap=True),
            web=ui and not lacking,
        )
    )


def _check_exposure(settings: Settings) -> None:
    """A web process off loopback without a token is a usage error: exit 2 before anything starts."""
    from .web import check_exposure

    try:
        check_exposure(settings.ui)
    except EvalqError as exc:
        raise _fail(str(exc), 2) from None


@app.command("ui")
def ui_command(
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
) -> None:
    """Run the web process: the dashboard (queue, jobs, trends, compare), and lmms-eval's server API with
    --lmms-eval-api; read-only unless --lmms-eval-api or --allow-cancel.

    Example: `evalq --nats-url nats://10.0.0.5:4222 ui --host 0.0.0.0 --token $TOKEN --lmms-eval-api`
    """
    _need_extras("ui")
    from .processes import run_ui

    # `--token` at the top level is NATS's; this one is the web process's own.
    settings = _settings(
        ctx, ui_host=host, ui_port=port, ui_token=ui_token, lmms_eval_api=lmms_eval_api, ui_allow_cancel=allow_cancel
    )
    _check_exposure(settings)
    api = " (lmms-eval API on)" if settings.ui.lmms_eval_api else ""
    _run(
        run_ui(settings, ready=lambda url: errors.print(_shown(f"evalq ui: {url}{api}; Ctrl-C stops"), soft_wrap=True))
    )


# --- jobs -----------------------------------------------------------------------------


def _parse_pairs(items: list[str] | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise _fail(f"{option} expects k=v, got {item!r}", 2)
        pairs[key] = value
    return pairs


def _number(text: str | None) -> int | float | str | None:
    if text is None:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


@app.command()
def submit(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="lmms-eval model name, e.g. dummy, huggingface, qwen2_5_vl.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated task names.")],
    model_args: Annotated[Optional[str], typer.Option(help="k=v,k=v passed to the model.")] = None,
    limit: Annotated[Optional[str], typer.Option(help="Documents per task (int) or a fraction in (0, 1].")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[str], typer.Option(help="An int, 'auto' or 'auto:N'.")] = None,
    device: Annotated[Optional[str], typer.Option(help="e.g. cuda:0 or cpu.")] = None,
    gen_kwargs: Annotated[Optional[str], typer.Option(help="k=v,k=v generation arguments.")] = None,
    num_gpus: Annotated[int, typer.Option(help="GPUs for this job (>1 uses accelerate).")] = 1,
    output_dir: Annotated[
        Optional[str], typer.Option(help="A relative folder under the worker's results root.")
    ] = None,
    log_samples: Annotated[bool, typer.Option(help="Keep per-sample outputs.")] = True,
    predict_only: Annotated[bool, typer.Option(help="Generate without scoring.")] = False,
    pool: Annotated[str, typer.Option(help="Worker pool.")] = "default",
    label: Annotated[Optional[list[str]], typer.Option(help="k=v context echoed in events (repeatable).")] = None,
    idempotency_key: Annotated[Optional[str], typer.Option(help="Retry-safe key: same key, same job.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job to its end, like `evalq watch`.")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="With --wait: give up after this many seconds.")] = None,
    job_timeout: Annotated[
        Optional[int], typer.Option(help="Seconds the evaluation may run before it is stopped and failed.")
    ] = None,
    shards: Annotated[
        int, typer.Option(help="Split the evaluation into at most this many pieces, run by the pool's workers at once.")
    ] = 1,
    fresh_model: Annotated[
        bool, typer.Option("--fresh-model", help="Load the model afresh, even where a worker keeps it loaded.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Submit an evaluation job; prints its id and queue position.

    Example: `evalq submit --model dummy --tasks evalq_demo --limit 8 --label epoch=3 --wait`

    Sharded: `evalq submit --model dummy --tasks evalq_demo,evalq_shard_demo --shards 5 --wait`
    """
    body: dict[str, Any] = {
        "model": model,
        "tasks": [t for t in tasks.split(",") if t],
        "num_gpus": num_gpus,
        "log_samples": log_samples,
        "predict_only": predict_only,
        "pool": pool,
        "labels": _parse_pairs(label, "--label"),
    }
    if shards != 1:
        body["shards"] = shards
    if fresh_model:
        body["fresh_model"] = True
    optional = {
        "model_args": model_args,
        "limit": _number(limit),
        "num_fewshot": num_fewshot,
        "batch_size": _number(batch_size),
        "device": device,
        "gen_kwargs": gen_kwargs,
        "output_dir": output_dir,
        "timeout": job_timeout,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    settings = _settings(ctx)

    async def main() -> int:
        async with AsyncClient(settings) as client:
            accepted = await client.submit(body, idempotency_key=idempotency_key)
            if json_:
                _dump(accepted)
            else:
                dup = " (duplicate)" if accepted.duplicate else ""
                console.print(
                    f"[green]accepted[/green] {_shown(accepted.job_id)}{dup}  position {accepted.position_in_queue}  "
                    f"(pool {_shown(pool)}, stream seq {accepted.stream_seq})",
                    highlight=False,
                )
            if not wait:
                return 0
            return await _follow(client, accepted.job_id, json_, timeout)

    code = _run(main())
    raise typer.Exit(code)


@app.command()
def status(ctx: typer.Context, job_id: str, json_: JsonOpt = False) -> None:
    """Show one job's record (live queue position while queued). Any unique start of the id will do.

    Example: `evalq status 3f7bc3b2 --json`
    """

    async def main(client: AsyncClient) -> None:
        info = await client.get_job(await client.resolve(job_id))
        if json_:
            _dump(info)
            return
        _print_job(info)

    _client_command(main)(ctx)


@app.command()
def cancel(ctx: typer.Context, job_id: str, json_: JsonOpt = False) -> None:
    """Cancel a queued or running job (a running one becomes `cancelling`, then `cancelled`).

    Example: `evalq cancel 3f7bc3b2-786a-46c5-9a50-2574cb77978d`
    """

    async def main(client: AsyncClient) -> None:
        reply = await client.cancel_job(await client.resolve(job_id))
        if json_:
            _dump(reply)
        else:
            console.print(
                f"{_shown(reply.job_id)}: [bold]{_shown(reply.status)}[/bold] - {_shown(reply.message)}",
                highlight=False,
            )

    _client_command(main)(ctx)


@app.command()
def watch(
    ctx: typer.Context,
    job_id: str,
    timeout: Annotated[Optional[float], typer.Option(help="Give up after this many seconds (exit 4).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Follow a job's events live: a progress bar per phase, then its metrics.

    Exit code 0 when it completes, 1 when it fails, 3 when it is cancelled.
    Example: `evalq watch 3f7bc3b2-786a-46c5-9a50-2574cb77978d`
    """
    settings = _settings(ctx)

    async def main() -> int:
        async with AsyncClient(settings) as client:
            full_id = await client.resolve(job_id)
            await client.get_job(full_id)  # 404 before waiting on an unknown id
            return await _follow(client, full_id, json_, timeout)

    raise typer.Exit(_run(main()))


async def _follow(client: AsyncClient, job_id: str, json_: bool, timeout: float | None) -> int:
    final: Event | None = None
    async with asyncio.timeout(timeout):
        if json_:
            async for event in client.watch(job_id):
                _dump(event)
                final = event
        else:
            final = await _follow_pretty(client, job_id)
    if isinstance(final, Completed):
        if not json_:
            _print_metrics(final.metrics)
        return 0
    if isinstance(final, Failed):
        if not json_:
            errors.print(f"[red]failed:[/red] {_shown(final.error)}", highlight=False)
            if final.log_tail:
                # split("\n"), not splitlines(): any other line break stays inside its line, escaped.
                errors.print(_shown("\n".join(final.log_tail.split("\n")[-10:]), lines=True), highlight=False)
        return EXIT_FAILED
    if isinstance(final, Cancelled):
        if not json_:
            errors.print(f"[yellow]cancelled:[/yellow] {_shown(final.reason)}", highlight=False)
        return EXIT_CANCELLED
    return EXIT_FAILED


async def _follow_pretty(client: AsyncClient, job_id: str) -> Event | None:
    final: Event | None = None
    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        async for event in client.watch(job_id):
            final = event
            if isinstance(event, Queued):
                progress.console.print(_shown(f"queued   {job_id} (pool {event.pool})"), highlight=False)
            elif isinstance(event, Started):
                progress.console.print(_shown(f"started  on {event.worker} (attempt {event.attempt})"), highlight=False)
            elif isinstance(event, Requeued):
                progress.console.print(_shown(f"requeued {event.reason}"), highlight=False)
            elif isinstance(event, ShardStarted):
                line = f"piece {event.shard + 1}/{event.shards} started on {event.worker} (attempt {event.attempt})"
                progress.console.print(_shown(line), highlight=False)
            elif isinstance(event, ShardCompleted):
                line = f"piece {event.shard + 1} completed on {event.worker} in {event.seconds}s"
                progress.console.print(_shown(line), highlight=False)
            elif isinstance(event, ShardFailed):
                line = f"piece {event.shard + 1} failed on {event.worker} (attempt {event.attempt}): {event.error}"
                progress.console.print(f"[red]{_shown(line)}[/red]", highlight=False)
            elif isinstance(event, ProgressEvent):
                p = event.progress
                if p.phase not in bars:
                    bars[p.phase] = progress.add_task(_shown(p.phase), total=p.total)
                progress.update(bars[p.phase], completed=p.done, total=p.total)
            elif isinstance(event, Completed):
                for task_id in bars.values():
                    task = progress.tasks[task_id]
                    progress.update(task_id, completed=task.total)
                progress.console.print(f"completed in {event.duration_s}s", highlight=False)
    return final


def _print_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    table = Table(title="metrics")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for task, values in metrics.items():
        for name, value in values.items():
            table.add_row(_shown(task), _shown(name), f"{value:.4g}" if isinstance(value, float) else _shown(value))
    console.print(table)


def _print_job(info: JobInfo) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, Any]] = [
        ("job", info.job_id),
        ("status", info.status),
        ("pool", info.pool),
        ("position", info.position_in_queue),
        ("attempts", info.attempts),
        ("worker", info.worker),
        ("created", info.created_at),
        ("started", info.started_at),
        ("finished", info.completed_at),
        ("labels", ", ".join(f"{k}={v}" for k, v in info.labels.items()) or None),
        ("model", info.request.model if info.request else None),
        ("tasks", ",".join(info.request.tasks) if info.request else None),
        ("progress", f"{info.progress.phase} {info.progress.done}/{info.progress.total}" if info.progress else None),
        ("pieces", f"{info.shards_done}/{info.shards} done" if info.pieces else None),
        ("error", info.error),
    ]
    for key, value in rows:
        if value is not None:
            table.add_row(key, _shown(value))
    console.print(table)
    if info.pieces:
        _print_pieces(info)
    if info.result and info.result.metrics:
        _print_metrics(info.result.metrics)


def _print_pieces(info: JobInfo) -> None:
    table = Table(title="pieces")
    for column in ("piece", "tasks", "documents", "status", "attempts", "worker", "seconds"):
        table.add_column(column)
    for piece in info.pieces:
        span = "" if piece.offset is None else f" [{piece.offset}, {piece.offset + (piece.limit or 0)})"
        cells = (
            str(piece.index + 1),
            ",".join(piece.tasks) + span,
            f"{piece.done}/{piece.docs}",
            piece.status,
            str(piece.attempts),
            piece.worker or "",
            "" if piece.seconds is None else f"{piece.seconds:.1f}",
        )
        table.add_row(*(_shown(cell) for cell in cells))
    console.print(table)


@app.command()
def results(
    ctx: typer.Context,
    job_id: str,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder to write into (a <job_id> folder is made).")
    ] = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Download a job's artifacts (results.json, samples, eval.log) from the object store.

    Example: `evalq results 3f7bc3b2-786a-46c5-9a50-2574cb77978d -o ./runs`
    """

    async def main(client: AsyncClient) -> None:
        full_id = await client.resolve(job_id)
        files = await client.results(full_id, output)
        if not files:
            raise _fail(f"no artifacts stored for job {full_id}")
        if json_:
            _dump({"job_id": full_id, "files": [str(f) for f in files]})
        else:
            for path in files:
                console.print(_shown(path), highlight=False)

    _client_command(main)(ctx)


@app.command()
def events(
    ctx: typer.Context,
    job: Annotated[str, typer.Option(help="Only this job's events.")] = "*",
    history: Annotated[bool, typer.Option("--history", help="Start from the oldest stored event.")] = False,
    count: Annotated[Optional[int], typer.Option(help="Stop after this many events.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Tail every job's events, one line each (`--json` for JSON lines).

    Example: `evalq events --json | jq 'select(.type == "completed") | .metrics'`
    """

    async def main(client: AsyncClient) -> None:
        seen = 0
        async for event in client.events(job, history=history):
            if json_:
                _dump(event)
            else:
                console.print(_shown(_event_line(event)), highlight=False)
            seen += 1
            if count is not None and seen >= count:
                return

    _client_command(main)(ctx)


def _event_line(event: Event) -> str:
    kind = type(event).__struct_config__.tag  # type: ignore[attr-defined]
    detail = ""
    if isinstance(event, ProgressEvent):
        detail = f"{event.progress.phase} {event.progress.done}/{event.progress.total}"
    elif isinstance(event, Completed):
        detail = json.dumps(event.metrics)
    elif isinstance(event, Failed):
        detail = event.error
    elif isinstance(event, (Cancelled, Requeued)):
        detail = event.reason
    elif isinstance(event, ShardStarted):
        detail = f"piece {event.shard + 1}/{event.shards}"
    elif isinstance(event, ShardCompleted):
        detail = f"piece {event.shard + 1} in {event.seconds}s"
    elif isinstance(event, ShardFailed):
        detail = f"piece {event.shard + 1}: {event.error}"
    labels = " ".join(f"{k}={v}" for k, v in event.labels.items())
    return f"{event.time} {event.job_id} {kind:<9} {event.worker or '-'} {detail} {labels}".rstrip()


@app.command()
def queue(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Show queued and running jobs per pool, with positions, labels, attempts and progress.

    Example: `evalq queue --json`
    """

    async def main(client: AsyncClient) -> None:
        state = await client.queue()
        if json_:
            _dump(state)
            return
        table = Table(title=f"queue: {state.queue_size} waiting, {len(state.running_jobs)} running")
        for column in ("pool", "position", "job", "status", "labels", "attempts", "worker", "progress", "pieces"):
            table.add_column(column, no_wrap=column == "job")
        ids = [(None, job) for job in state.running_jobs] + [
            (pool, job) for pool, jobs in state.queued_jobs.items() for job in jobs
        ]
        infos = await asyncio.gather(*(client.get_job(job) for _, job in ids[:200]), return_exceptions=True)
        for info in infos:
            if not isinstance(info, JobInfo):
                continue
            progress = f"{info.progress.phase} {info.progress.percent:.0f}%" if info.progress else ""
            cells = (
                info.pool,
                "" if info.position_in_queue is None else str(info.position_in_queue),
                info.job_id[:SHORT_ID],
                info.status,
                " ".join(f"{k}={v}" for k, v in info.labels.items()),
                str(info.attempts),
                info.worker or "",
                progress,
                f"{info.shards_done}/{info.shards}" if info.shards > 1 else "",
            )
            table.add_row(*(_shown(cell) for cell in cells))
        console.print(table)
        console.print(
            f"completed {state.completed_jobs}  failed {state.failed_jobs}  cancelled {state.cancelled_jobs}  "
            f"workers {len(state.workers)}",
            highlight=False,
        )

    _client_command(main)(ctx)


_AGO = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _when(text: str | None, option: str) -> str | None:
    """An RFC 3339 time, or `30m`/`2h`/`7d`/`1w` ago, as RFC 3339; exit 2 for anything else."""
    if text is None:
        return None
    import datetime as dt

    ago = _AGO.fullmatch(text.strip())
    if ago:
        delta = dt.timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
        return (dt.datetime.now(dt.UTC) - delta).isoformat()
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        example = "an RFC 3339 time (2025-03-01T12:00:00Z) or an age (30m, 2h, 7d)"
        raise _fail(f"{option} expects {example}, got {text!r}", 2) from None
    if value.tzinfo is None:
        raise _fail(f"{option} needs a time zone (add Z for UTC), got {text!r}", 2)
    return value.isoformat()


def _metric_value(metrics: dict[str, dict[str, Any]], ref: str) -> Any:
    """`task/metric` of a job's metrics: lmms-eval's key itself, or the first `metric,filter` key."""
    task, _, name = ref.partition("/")
    values = metrics.get(task) or {}
    if name in values:
        return values[name]
    return next((v for k, v in values.items() if k.partition(",")[0] == name), None)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@app.command()
def jobs(
    ctx: typer.Context,
    label: Annotated[
        Optional[list[str]], typer.Option(help="Only jobs with this k=v label (repeat: all must match).")
    ] = None,
    status: Annotated[
        Optional[list[str]], typer.Option(help="Only jobs in this status (repeat for any of several).")
    ] = None,
    pool: Annotated[Optional[str], typer.Option(help="Only jobs of this pool.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Created at or after: RFC 3339, or an age (2h, 7d).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Created before: RFC 3339, or an age.")] = None,
    metric: Annotated[
        Optional[list[str]], typer.Option(help="A task/metric column, e.g. mmmu_val/mmmu_acc (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many jobs, newest first.")] = 50,
    csv_: Annotated[bool, typer.Option("--csv", help="Print CSV (full ids) for spreadsheets.")] = False,
    json_: JsonOpt = False,
) -> None:
    """List past and current jobs, newest first, with filters and one column per chosen metric.

    Example: `evalq jobs --label run=exp1 --status completed --metric evalq_demo/exact_match --since 7d`
    """
    if limit < 1:
        raise _fail("--limit must be at least 1", 2)
    if json_ and csv_:
        raise _fail("choose one of --json and --csv", 2)
    chosen = list(metric or [])
    for ref in chosen:
        if "/" not in ref.strip("/"):
            raise _fail(f"--metric expects task/metric, got {ref!r}", 2)
    filters: dict[str, Any] = {
        "status": status or None,
        "pool": pool,
        "labels": _parse_pairs(label, "--label") or None,
        "created_after": _when(since, "--since"),
        "created_before": _when(until, "--until"),
        # JSON lines carry every metric unless some are chosen.
        "metrics": chosen or (["*"] if json_ else None),
    }

    async def main(client: AsyncClient) -> None:
        found: list[Any] = []
        cursor: str | None = None
        while len(found) < limit:
            page = await client.jobs(**filters, limit=min(limit - len(found), 1000), cursor=cursor)
            found += page.jobs
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        if json_:
            for job in found:
                _dump(job)
            return
        if csv_:
            import csv

            out = csv.writer(sys.stdout)
            out.writerow(["job_id", "status", "pool", "created_at", "completed_at", "duration_s", "labels", *chosen])
            for job in found:
                labels = ";".join(f"{k}={v}" for k, v in job.labels.items())
                cells = [job.job_id, job.status, job.pool, job.created_at, job.completed_at or "", job.duration_s]
                out.writerow(
                    [*(_cell(c) for c in cells), labels, *(_cell(_metric_value(job.metrics, m)) for m in chosen)]
                )
            return
        table = Table(title=f"{len(found)} jobs" + ("" if cursor is None or len(found) < limit else " (more: --limit)"))
        for column in ("job", "status", "pool", "created", "duration", "labels"):
            table.add_column(column, no_wrap=column in ("job", "created"))
        for ref in chosen:
            table.add_column(_shown(ref), justify="right")
        for job in found:
            duration = "" if job.duration_s is None else f"{job.duration_s:.1f}s"
            if job.status in ("running", "cancelling") and job.progress is not None:
                duration = f"{job.progress.phase} {job.progress.percent:.0f}%"
            row = [
                job.job_id[:SHORT_ID],
                job.status,
                job.pool,
                job.created_at.replace("T", " ")[:19],
                duration,
                " ".join(f"{k}={v}" for k, v in job.labels.items()),
                *(_cell(_metric_value(job.metrics, m)) for m in chosen),
            ]
            table.add_row(*(_shown(cell) for cell in row))
        console.print(table)

    _client_command(main)(ctx)


@app.command()
def workers(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List live workers: host, pool, GPUs, lmms-eval version, current job.

    Example: `evalq workers --json`
    """

    async def main(client: AsyncClient) -> None:
        health = await client.health()
        if json_:
            _dump(health.workers)
            return
        table = Table(title=f"{len(health.workers)} workers")
        for column in ("worker", "host", "pool", "gpus", "lmms-eval", "models", "tasks", "current job", "heartbeat"):
            table.add_column(column)
        for w in health.workers:
            gpus = ", ".join(g.name for g in w.gpus) or "cpu"
            cells = (
                w.worker_id,
                w.host,
                w.pool,
                gpus,
                w.lmms_eval_version or "",
                "?" if w.models is None else str(len(w.models)),
                "?" if w.tasks is None else str(len(w.tasks)),
                w.current_job or "",
                w.heartbeat_at,
            )
            table.add_row(*(_shown(cell) for cell in cells))
        console.print(table)

    _client_command(main)(ctx)


@app.command()
def health(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Check the gateway: status, pools, queue size, workers, and its evalq version.

    Warns (on stderr) about each worker whose evalq differs from the gateway's in minor version.

    Example: `evalq health --json`
    """

    async def main(client: AsyncClient) -> None:
        state = await client.health()
        if json_:
            _dump(state)
        else:
            console.print(
                _shown(
                    f"{state.status}: pools {', '.join(state.pools)}; {state.queue_size} queued; "
                    f"{len(state.workers)} workers; evalq {state.version}"
                ),
                highlight=False,
            )
        # On stderr, so `--json` stays one object on stdout.
        for line in _version_skew(state):
            errors.print(f"[yellow]warning:[/yellow] {_shown(line)}", highlight=False, soft_wrap=True)

    _client_command(main)(ctx)


def _minor(version: str) -> str:
    """`major.minor` of a version; the whole string when it has no such prefix."""
    match = re.match(r"\d+\.\d+", version)
    return match.group() if match else version


def _version_skew(state: Health) -> list[str]:
    """A line per worker whose evalq differs from the gateway's in major or minor version.

    A gateway and its workers are meant to run one minor version: the wire types between them
    may change across minor versions. An entry without a version predates the field: not judged.
    """
    return [
        f"worker {w.worker_id} runs evalq {w.version}, the gateway {state.version}: "
        "upgrade them to the same minor version"
        for w in state.workers
        if w.version and _minor(w.version) != _minor(state.version)
    ]


@app.command()
def tasks(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List the tasks that live workers can run.

    Example: `evalq tasks | grep mmmu`
    """

    async def main(client: AsyncClient) -> None:
        names = await client.list_tasks()
        _dump({"tasks": names}) if json_ else console.print("\n".join(_shown(n) for n in names), highlight=False)

    _client_command(main)(ctx)


@app.command()
def models(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List the models that live workers can run.

    Example: `evalq models --json`
    """

    async def main(client: AsyncClient) -> None:
        names = await client.list_models()
        _dump({"models": names}) if json_ else console.print("\n".join(_shown(n) for n in names), highlight=False)

    _client_command(main)(ctx)


# --- training runs (tracking.py, checkpoints.py) ---------------------------------------


@app.command()
def track(
    ctx: typer.Context,
    tensorboard: Annotated[
        Optional[Path], typer.Option(help="Log to TensorBoard event files under this folder.")
    ] = None,
    mlflow: Annotated[Optional[str], typer.Option(help="Log to MLflow at this tracking URI.")] = None,
    mlflow_experiment: Annotated[str, typer.Option(help="The MLflow experiment.")] = "evalq",
    wandb: Annotated[Optional[Path], typer.Option(help="Log to Weights & Biases, run files under this folder.")] = None,
    wandb_project: Annotated[str, typer.Option(help="The W&B project.")] = "evalq",
    wandb_mode: Annotated[str, typer.Option(help="W&B mode: offline (sync later with `wandb sync`) or online.")] = (
        "offline"
    ),
    step_label: Annotated[str, typer.Option(help="The label that holds the training step.")] = "step",
    run_label: Annotated[str, typer.Option(help="The label that names the run.")] = "run",
    name: Annotated[str, typer.Option(help="This tracker's name: its durable consumer is <prefix>-track-<name>.")] = (
        "tracker"
    ),
    from_now: Annotated[
        bool, typer.Option("--from-now", help="A new consumer starts with jobs completed from now on.")
    ] = False,
    max_jobs: Annotated[Optional[int], typer.Option(help="Stop after this many completed jobs.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Log every completed job's metrics to experiment trackers, at the step its label names.

    A durable consumer keeps its place while this is down: restarted, it logs what completed
    meanwhile, and never logs a job twice.

    Example: `evalq track --tensorboard runs/ --mlflow http://mlflow:5000 --step-label step --run-label run`
    """
    from . import tracking
    from .processes import on_signals

    if wandb_mode not in ("offline", "online"):
        raise _fail(f"--wandb-mode must be offline or online, got {wandb_mode!r}", 2)
    settings = _settings(ctx)
    trackers: list[tracking.Tracker] = []
    try:
        if tensorboard is not None:
            trackers.append(tracking.TensorBoardTracker(tensorboard))
        if mlflow is not None:
            trackers.append(tracking.MlflowTracker(mlflow, mlflow_experiment))
        if wandb is not None:
            trackers.append(tracking.WandbTracker(wandb, wandb_project, wandb_mode))
    except tracking.MissingExtra as exc:
        raise _fail(str(exc), 2) from None
    except EvalqError as exc:
        raise _fail(str(exc), 2) from None
    if not trackers:
        raise _fail("name a tracker: --tensorboard DIR, --mlflow URI or --wandb DIR", 2)
    options = tracking.TrackOptions(
        name=name, step_label=step_label, run_label=run_label, from_now=from_now, max_jobs=max_jobs
    )

    def show(outcome: tracking.Outcome) -> None:
        if json_:
            _dump(outcome.__dict__)
        elif outcome.step is None:
            console.print(_shown(f"{outcome.job_id}: no {step_label!r} label, not logged"), highlight=False)
        else:
            done = ", ".join(f"{k} {v}" for k, v in outcome.trackers.items())
            console.print(_shown(f"{outcome.job_id}: run {outcome.run} step {outcome.step}: {done}"), highlight=False)

    async def main() -> None:
        async with tracking.Tracking(settings, trackers, options) as tracker:
            errors.print(_shown(f"tracking completed jobs as consumer {tracker.durable}"), highlight=False)
            remove = on_signals(tracker.stop)
            try:
                await tracker.run(show)
            finally:
                remove()

    _run(main())


@app.command("watch-dir")
def watch_dir(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="The folder the trainer writes checkpoints into.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated task names.")],
    pattern: Annotated[str, typer.Option(help="Checkpoint folders' names, a glob.")] = "checkpoint-*",
    model: Annotated[str, typer.Option(help="lmms-eval model name; gets model_args pretrained=<folder>.")] = (
        "huggingface"
    ),
    model_args: Annotated[Optional[str], typer.Option(help="More k=v,k=v model arguments.")] = None,
    limit: Annotated[Optional[str], typer.Option(help="Documents per task (int) or a fraction in (0, 1].")] = None,
    batch_size: Annotated[Optional[str], typer.Option(help="An int, 'auto' or 'auto:N'.")] = None,
    device: Annotated[Optional[str], typer.Option(help="e.g. cuda:0 or cpu.")] = None,
    pool: Annotated[str, typer.Option(help="Worker pool.")] = "default",
    label: Annotated[Optional[list[str]], typer.Option(help="k=v context echoed in events (repeatable).")] = None,
    step_regex: Annotated[str, typer.Option(help="Finds the step in a folder's name (its first group).")] = r"(\d+)",
    step_label: Annotated[str, typer.Option(help="The label that gets the step.")] = "step",
    marker: Annotated[
        Optional[str], typer.Option(help="Complete when this file exists (default: every weight shard present).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between scans.")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Scan twice, --interval apart, submit, and exit.")] = False,
    state: Annotated[
        Optional[Path], typer.Option(help="What was submitted (default $EVALQ_HOME/watch-dir/<folder hash>.json).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Submit one evaluation per new checkpoint folder, once it is complete and no longer changing.

    A restart submits nothing twice: each submission's Idempotency-Key comes from the folder's
    path and content, and the state file records it.

    Example: `evalq watch-dir out/ --pattern 'checkpoint-*' --tasks mmmu_val --limit 100 --label run=exp1`
    """
    from . import checkpoints
    from .processes import on_signals

    request: dict[str, Any] = {"model": model, "tasks": [t for t in tasks.split(",") if t], "pool": pool}
    request["labels"] = _parse_pairs(label, "--label")
    optional = {"model_args": model_args, "limit": _number(limit), "batch_size": _number(batch_size), "device": device}
    request.update({k: v for k, v in optional.items() if v is not None})
    settings = _settings(ctx)

    def show(checkpoint: checkpoints.Checkpoint) -> None:
        if json_:
            _dump(checkpoint.__dict__)
        else:
            dup = " (already submitted)" if checkpoint.duplicate else ""
            console.print(
                _shown(f"submitted {checkpoint.job_id}{dup} for {checkpoint.path} (step {checkpoint.step})"),
                highlight=False,
            )

    async def main() -> None:
        async with AsyncClient(settings) as client:
            try:
                watcher = checkpoints.DirWatcher(
                    client,
                    directory,
                    request,
                    pattern=pattern,
                    step_regex=step_regex,
                    step_label=step_label,
                    marker=marker,
                    state_file=state,
                )
                watcher.candidates()
            except EvalqError as exc:
                raise _fail(str(exc), 2) from None
            stop = asyncio.Event()
            remove = on_signals(stop.set)
            try:
                await watcher.run(interval, stop, show, passes=2 if once else None)
            finally:
                remove()

    _run(main())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
