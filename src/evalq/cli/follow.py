"""Following one job to its end, as `evalq watch` and `evalq submit --wait` show it.

Only the job's events are read: the caller has made sure the job exists (it asked for its
record once, or has just submitted it), so following asks the gateway nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..publisher import AsyncClient
from ..schemas import (
    TERMINAL_EVENTS,
    Cancelled,
    Completed,
    Event,
    Failed,
    ProgressEvent,
    Queued,
    Requeued,
    ShardCompleted,
    ShardFailed,
    ShardStarted,
    Stalled,
    Started,
)
from .app import EXIT_CANCELLED, EXIT_FAILED
from .output import console, dump, errors, print_metrics, shown, work_line

__all__ = ["follow", "job_events"]


async def job_events(client: AsyncClient, job_id: str) -> AsyncIterator[Event]:
    """The job's events from the first stored one, ending after its terminal event."""
    # Closed on the way out, so the subscription ends with the job, not when it is collected.
    stored = cast(AsyncGenerator[Event, None], client.events(job_id, history=True))
    async with contextlib.aclosing(stored):
        async for event in stored:
            yield event
            if isinstance(event, TERMINAL_EVENTS):
                return


async def follow(client: AsyncClient, job_id: str, json_: bool, timeout: float | None) -> int:
    """Print the job's events until it ends; its exit code (0 completed, 1 failed, 3 cancelled)."""
    final: Event | None = None
    async with asyncio.timeout(timeout):
        if json_:
            async for event in job_events(client, job_id):
                dump(event)
                final = event
        else:
            final = await _follow_pretty(client, job_id)
    if isinstance(final, Completed):
        if not json_:
            print_metrics(final.metrics)
        return 0
    if isinstance(final, Failed):
        if not json_:
            errors.print(f"[red]failed:[/red] {shown(final.error)}", highlight=False)
            if final.log_tail:
                # split("\n"), not splitlines(): any other line break stays inside its line, escaped.
                errors.print(shown("\n".join(final.log_tail.split("\n")[-10:]), lines=True), highlight=False)
        return EXIT_FAILED
    if isinstance(final, Cancelled):
        if not json_:
            errors.print(f"[yellow]cancelled:[/yellow] {shown(final.reason)}", highlight=False)
        return EXIT_CANCELLED
    return EXIT_FAILED


async def _follow_pretty(client: AsyncClient, job_id: str) -> Event | None:
    """A line per step, a progress bar per phase; returns the last event."""
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
        async for event in job_events(client, job_id):
            final = event
            if isinstance(event, Queued):
                progress.console.print(shown(f"queued   {job_id} (pool {event.pool})"), highlight=False)
            elif isinstance(event, Started):
                line = f"started  on {event.worker} (attempt {event.attempt})"
                if not event.loads_model:
                    line += ", no model loaded"
                elif event.weights_swapped:
                    line += f", weights swapped in {event.model_load_seconds} s"
                elif event.model_reused:
                    line += ", model reused"
                elif event.model_load_seconds is not None:
                    line += f", model loaded in {event.model_load_seconds} s"
                if event.model_note:
                    line += f" ({event.model_note})"
                if event.resumed_responses or event.resumed_scores:
                    line += f", resuming {event.resumed_responses} responses and {event.resumed_scores} scores"
                progress.console.print(shown(line), highlight=False)
            elif isinstance(event, Requeued):
                progress.console.print(shown(f"requeued {event.reason}"), highlight=False)
            elif isinstance(event, Stalled):
                line = f"stalled: no progress for {event.seconds:.0f}s (since {event.since})"
                progress.console.print(f"[yellow]{shown(line)}[/yellow]", highlight=False)
            elif isinstance(event, ShardStarted):
                line = f"piece {event.shard + 1}/{event.shards} started on {event.worker} (attempt {event.attempt})"
                progress.console.print(shown(line), highlight=False)
            elif isinstance(event, ShardCompleted):
                line = f"piece {event.shard + 1} completed on {event.worker} in {event.seconds}s"
                progress.console.print(shown(line), highlight=False)
            elif isinstance(event, ShardFailed):
                line = f"piece {event.shard + 1} failed on {event.worker} (attempt {event.attempt}): {event.error}"
                progress.console.print(f"[red]{shown(line)}[/red]", highlight=False)
            elif isinstance(event, ProgressEvent):
                p = event.progress
                if p.phase not in bars:
                    bars[p.phase] = progress.add_task(shown(p.phase), total=p.total)
                progress.update(bars[p.phase], completed=p.done, total=p.total)
            elif isinstance(event, Completed):
                for task_id in bars.values():
                    task = progress.tasks[task_id]
                    progress.update(task_id, completed=task.total)
                progress.console.print(f"completed in {event.duration_s}s", highlight=False)
                if event.work is not None:
                    progress.console.print(f"work: {work_line(event.work)}", highlight=False)
    return final
