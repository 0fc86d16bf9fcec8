"""The commands about jobs: submit, rescore, status, cancel, watch, results, events, queue, jobs."""

from __future__ import annotations

import csv
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import msgspec
import typer
from rich.table import Table

from ..errors import Unavailable
from ..fields import Priority
from ..publisher import AsyncClient
from ..schemas import JOBS_PAGE_MAX, CacheMode, JobAccepted, JobSummary, QueuedRow
from ..turnaround import read_turnaround, turnaround_line
from .app import JsonOpt, client_command, number, parse_pairs, run, settings
from .follow import follow
from .gates import print_verdict, verdict_code
from .output import (
    SHORT_ID,
    console,
    dump,
    errors,
    event_line,
    fail,
    print_job,
    print_rows,
    shown,
    waiting_reason,
)

__all__ = ["cancel", "events", "jobs", "queue", "rescore", "results", "status", "submit", "watch"]

# Rows `evalq queue` shows: the running jobs, then the head of each pool's queue.
QUEUE_ROWS = 200
# The statuses of the jobs a queue holds, whose details `evalq queue` asks for in one page.
ACTIVE = ["queued", "running", "cancelling"]


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
    cache: Annotated[
        Optional[CacheMode],
        typer.Option(
            help="The response cache: `off`, `read` (reuse answers other jobs gave), `read-write` (reuse and add "
            "this job's) or `refresh` (compute all and add them). Default: the pool's."
        ),
    ] = None,
    seed: Annotated[
        Optional[int],
        typer.Option(min=0, help="lmms-eval's --seed; with one, sampled answers may be cached too."),
    ] = None,
    priority: Annotated[
        Optional[Priority],
        typer.Option(
            help="Its place in the pool's queue: a higher level starts first; a waiting job rises a level every "
            "aging period (up to high). A team may be capped below urgent (`evalq teams`). Default: normal."
        ),
    ] = None,
    gate: Annotated[
        Optional[str],
        typer.Option(
            help="A stored gate policy (`evalq gate set`) that judges the job when it completes. With --wait, "
            "the exit code is the verdict's: 0 GO, 5 NO-GO, 6 INCONCLUSIVE."
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Submit an evaluation job; prints its id, queue position and why it waits.

    Example: `evalq submit --model dummy --tasks evalq_demo --limit 8 --label epoch=3 --wait`

    Sharded: `evalq submit --model dummy --tasks evalq_demo,evalq_shard_demo --shards 5 --wait`

    Example: `evalq submit --model dummy --tasks evalq_demo --priority high`

    Gated: `evalq submit --model dummy --tasks evalq_demo --label run=r1 --label step=200 --gate release --wait`
    """
    body: dict[str, Any] = {
        "model": model,
        "tasks": [t for t in tasks.split(",") if t],
        "num_gpus": num_gpus,
        "log_samples": log_samples,
        "predict_only": predict_only,
        "pool": pool,
        "labels": parse_pairs(label, "--label"),
    }
    if shards != 1:
        body["shards"] = shards
    if fresh_model:
        body["fresh_model"] = True
    optional = {
        "model_args": model_args,
        "limit": number(limit),
        "num_fewshot": num_fewshot,
        "batch_size": number(batch_size),
        "device": device,
        "gen_kwargs": gen_kwargs,
        "output_dir": output_dir,
        "timeout": job_timeout,
        "cache": cache,
        "seed": seed,
        "priority": priority,
        "gate": gate,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    chosen = settings(ctx)

    async def main() -> int:
        async with AsyncClient(chosen) as client:
            accepted = await client.submit(body, idempotency_key=idempotency_key)
            code = await _accepted(client, accepted, f"pool {pool}", json_=json_, wait=wait, timeout=timeout)
            if code != 0 or not wait or gate is None:
                return code
            # Judged within moments of its completion; bounded, should no gateway judge it.
            verdict = await client.gates.wait(accepted.job_id, timeout=timeout or 60.0)
            if json_:
                dump(verdict)
            else:
                print_verdict(verdict)
            return verdict_code(verdict)

    raise typer.Exit(run(main()))


async def _accepted(
    client: AsyncClient, accepted: JobAccepted, where: str, *, json_: bool, wait: bool, timeout: float | None
) -> int:
    """Say a job was accepted (one line, or its JSON); with `wait`, follow it to its end. The exit code."""
    if json_:
        dump(accepted)
    else:
        dup = " (duplicate)" if accepted.duplicate else ""
        why = f"; waits: {accepted.waiting}" if accepted.waiting else ""
        console.print(
            f"[green]accepted[/green] {shown(accepted.job_id)}{dup}  position {accepted.position_in_queue}  "
            f"({shown(where)}, stream seq {accepted.stream_seq}{shown(why)})",
            highlight=False,
        )
    if not wait:
        return 0
    return await follow(client, accepted.job_id, json_, timeout)


def rescore(
    ctx: typer.Context,
    job_id: str,
    tasks: Annotated[
        Optional[str], typer.Option(help="Comma-separated: only these of the job's tasks (default: all of them).")
    ] = None,
    label: Annotated[
        Optional[list[str]], typer.Option(help="k=v labels for the new job, instead of the job's own (repeatable).")
    ] = None,
    pool: Annotated[Optional[str], typer.Option(help="Worker pool (default: the job's).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the new job to its end, like `evalq watch`.")] = False,
    timeout: Annotated[Optional[float], typer.Option(help="With --wait: give up after this many seconds.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Score a completed job's recorded responses again with the workers' task code as it is now; no
    model is loaded. Submits a new job (same request, one piece) and prints its id. Any unique start
    of the id will do.

    Example: `evalq rescore 3f7bc3b2 --tasks evalq_demo --wait`
    """
    chosen = settings(ctx)
    picked = [t for t in tasks.split(",") if t] if tasks is not None else None
    labels = parse_pairs(label, "--label") or None

    async def main() -> int:
        async with AsyncClient(chosen) as client:
            source = await client.resolve(job_id)
            accepted = await client.rescore(source, tasks=picked, labels=labels, pool=pool)
            return await _accepted(client, accepted, f"re-score of {source}", json_=json_, wait=wait, timeout=timeout)

    raise typer.Exit(run(main()))


def status(ctx: typer.Context, job_id: str, json_: JsonOpt = False) -> None:
    """Show one job's record (live queue position while queued). Any unique start of the id will do.

    A job with a `saved_at` label (a checkpoint's) also shows its turnaround: from the save
    to its metrics in the trackers, and where that time went.

    Example: `evalq status 3f7bc3b2 --json`
    """

    async def main(client: AsyncClient) -> None:
        info = await client.get_job(await client.resolve(job_id))
        # Computed here from the record and the job's events; the record holds none of it.
        spent = await read_turnaround(client.reads, info)
        if json_:
            dump({**msgspec.to_builtins(info), "turnaround": spent})
            return
        print_job(info)
        if spent is not None:
            table = Table(show_header=False, box=None)
            table.add_column(style="bold")
            table.add_column()
            table.add_row("turnaround", shown(turnaround_line(spent)))
            console.print(table)

    client_command(main)(ctx)


def cancel(ctx: typer.Context, job_id: str, json_: JsonOpt = False) -> None:
    """Cancel a queued or running job (a running one becomes `cancelling`, then `cancelled`).

    Example: `evalq cancel 3f7bc3b2-786a-46c5-9a50-2574cb77978d`
    """

    async def main(client: AsyncClient) -> None:
        reply = await client.cancel_job(await client.resolve(job_id))
        if json_:
            dump(reply)
        else:
            console.print(
                f"{shown(reply.job_id)}: [bold]{shown(reply.status)}[/bold] - {shown(reply.message)}",
                highlight=False,
            )

    client_command(main)(ctx)


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
    chosen = settings(ctx)

    async def main() -> int:
        async with AsyncClient(chosen) as client:
            full_id = await client.resolve(job_id)
            await client.get_job(full_id)  # 404 before waiting on an unknown id; the only request about it
            return await follow(client, full_id, json_, timeout)

    raise typer.Exit(run(main()))


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
            raise fail(f"no artifacts stored for job {full_id}")
        if json_:
            dump({"job_id": full_id, "files": [str(f) for f in files]})
        else:
            for path in files:
                console.print(shown(path), highlight=False)

    client_command(main)(ctx)


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
                dump(event)
            else:
                console.print(shown(event_line(event)), highlight=False)
            seen += 1
            if count is not None and seen >= count:
                return

    client_command(main)(ctx)


def queue(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Show running jobs, then each pool's queued jobs in the order they will start: position,
    team, priority, why each waits, labels, attempts and progress. Another team's job shows
    only its place, priority and reason.

    Example: `evalq queue --json | jq '.queue.default[] | select(.waiting != null)'`
    """

    async def main(client: AsyncClient) -> None:
        state = await client.queue()
        if json_:
            dump(state)
            return
        # The queue gives the order (`queue`: each pool's rows as the scheduler will start them;
        # a gateway without it gives ids only); one page of the job history gives the details.
        rows = state.queue or {
            pool: [QueuedRow(position=i, job_id=job) for i, job in enumerate(ids)]
            for pool, ids in state.queued_jobs.items()
        }
        order: list[tuple[str, QueuedRow | None]] = [(job, None) for job in state.running_jobs]
        order += [(row.job_id or "", row) for waiting in rows.values() for row in waiting]
        order = order[:QUEUE_ROWS]
        details: dict[str, JobSummary] = {}
        if any(job for job, _ in order):
            try:
                page = await client.jobs(status=ACTIVE, limit=JOBS_PAGE_MAX)
            except Unavailable as exc:  # a gateway still loading its history: the order alone
                errors.print(f"[yellow]warning:[/yellow] {shown(exc)}", highlight=False, soft_wrap=True)
            else:
                details = {job.job_id: job for job in page.jobs}
        pools = {id(row): pool for pool, waiting in rows.items() for row in waiting}
        table = [_queue_row(job, row, details.get(job), pools.get(id(row), "")) for job, row in order]
        columns = (
            "pool", "position", "job", "team", "priority", "status", "waiting",
            "labels", "attempts", "worker", "progress", "pieces",
        )  # fmt: skip
        title = f"queue: {state.queue_size} waiting, {len(state.running_jobs)} running"
        print_rows(title, columns, table, no_wrap=("job",))
        console.print(
            f"completed {state.completed_jobs}  failed {state.failed_jobs}  cancelled {state.cancelled_jobs}  "
            f"workers {len(state.workers)}",
            highlight=False,
        )

    client_command(main)(ctx)


def _queue_row(job_id: str, row: QueuedRow | None, job: JobSummary | None, pool: str) -> tuple[str, ...]:
    """A row of `evalq queue`: a running job (no `row`) or a queued one. Another team's job has
    no id; one missing from the page (past its first 1,000) shows what the queue knows."""
    # A job the page shows running has left the queue since the queue was read.
    still = row is not None and (job is None or job.status == "queued")
    queued = (str(row.position), waiting_reason(row.waiting)) if row is not None and still else ("", "")
    if job is None:
        return (
            pool,
            queued[0],
            job_id[:SHORT_ID] if job_id else "(another team)",
            "" if row is None else row.team or "",
            "" if row is None else row.priority,
            "queued" if row is not None else "running",
            queued[1],
            *("",) * 5,
        )
    return (
        job.pool,
        queued[0],
        job.job_id[:SHORT_ID],
        job.team,
        job.priority,
        job.status,
        queued[1],
        " ".join(f"{k}={v}" for k, v in job.labels.items()),
        str(job.attempts),
        job.worker or "",
        f"{job.progress.phase} {job.progress.percent:.0f}%" if job.progress else "",
        f"{job.shards_done}/{job.shards}" if job.shards > 1 else "",
    )


_AGO = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _when(text: str | None, option: str) -> str | None:
    """An RFC 3339 time, or `30m`/`2h`/`7d`/`1w` ago, as RFC 3339; exit 2 for anything else."""
    if text is None:
        return None
    ago = _AGO.fullmatch(text.strip())
    if ago:
        delta = dt.timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
        return (dt.datetime.now(dt.UTC) - delta).isoformat()
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        example = "an RFC 3339 time (2025-03-01T12:00:00Z) or an age (30m, 2h, 7d)"
        raise fail(f"{option} expects {example}, got {text!r}", 2) from None
    if value.tzinfo is None:
        raise fail(f"{option} needs a time zone (add Z for UTC), got {text!r}", 2)
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


def jobs(
    ctx: typer.Context,
    label: Annotated[
        Optional[list[str]], typer.Option(help="Only jobs with this k=v label (repeat: all must match).")
    ] = None,
    status: Annotated[
        Optional[list[str]], typer.Option(help="Only jobs in this status (repeat for any of several).")
    ] = None,
    pool: Annotated[Optional[str], typer.Option(help="Only jobs of this pool.")] = None,
    team: Annotated[
        Optional[str], typer.Option(help="Only jobs this team submitted (its NATS account; `default` without one).")
    ] = None,
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
        raise fail("--limit must be at least 1", 2)
    if json_ and csv_:
        raise fail("choose one of --json and --csv", 2)
    chosen = list(metric or [])
    for ref in chosen:
        if "/" not in ref.strip("/"):
            raise fail(f"--metric expects task/metric, got {ref!r}", 2)
    filters: dict[str, Any] = {
        "status": status or None,
        "pool": pool,
        "team": team,
        "labels": parse_pairs(label, "--label") or None,
        "created_after": _when(since, "--since"),
        "created_before": _when(until, "--until"),
        # JSON lines carry every metric unless some are chosen.
        "metrics": chosen or (["*"] if json_ else None),
    }

    async def main(client: AsyncClient) -> None:
        found: list[JobSummary] = []
        cursor: str | None = None
        while len(found) < limit:
            page = await client.jobs(**filters, limit=min(limit - len(found), JOBS_PAGE_MAX), cursor=cursor)
            found += page.jobs
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        if json_:
            for job in found:
                dump(job)
            return
        if csv_:
            out = csv.writer(sys.stdout)
            header = ["job_id", "status", "pool", "team", "created_at", "completed_at", "duration_s", "labels"]
            out.writerow([*header, *chosen])
            for job in found:
                labels = ";".join(f"{k}={v}" for k, v in job.labels.items())
                cells = [
                    job.job_id,
                    job.status,
                    job.pool,
                    job.team,
                    job.created_at,
                    job.completed_at or "",
                    job.duration_s,
                ]
                out.writerow(
                    [*(_cell(c) for c in cells), labels, *(_cell(_metric_value(job.metrics, m)) for m in chosen)]
                )
            return
        table = Table(title=f"{len(found)} jobs" + ("" if cursor is None or len(found) < limit else " (more: --limit)"))
        for column in ("job", "status", "pool", "team", "created", "duration", "labels"):
            table.add_column(column, no_wrap=column in ("job", "created"))
        for ref in chosen:
            table.add_column(shown(ref), justify="right")
        for job in found:
            duration = "" if job.duration_s is None else f"{job.duration_s:.1f}s"
            if job.status in ("running", "cancelling") and job.progress is not None:
                duration = f"{job.progress.phase} {job.progress.percent:.0f}%"
            row = [
                job.job_id[:SHORT_ID],
                job.status,
                job.pool,
                job.team,
                job.created_at.replace("T", " ")[:19],
                duration,
                " ".join(f"{k}={v}" for k, v in job.labels.items()),
                *(_cell(_metric_value(job.metrics, m)) for m in chosen),
            ]
            table.add_row(*(shown(cell) for cell in row))
        console.print(table)

    client_command(main)(ctx)
