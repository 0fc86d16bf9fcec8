"""What the `evalq` command prints: text from elsewhere made safe, tables, JSON for scripts.

Job output, errors, labels, names and paths come from other processes: a control character
could forge a line or reach the terminal (escaped by `text.escape_control`), and `[...]`
would be read as rich markup (escaped here, where rich is used).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..schemas import (
    Cancelled,
    Completed,
    Event,
    Failed,
    JobInfo,
    ProgressEvent,
    Requeued,
    ShardCompleted,
    ShardFailed,
    ShardStarted,
    Stalled,
    Started,
    Tracked,
    Work,
)
from ..text import escape_control

__all__ = [
    "SHORT_ID",
    "PlainFormatter",
    "console",
    "dump",
    "errors",
    "event_line",
    "fail",
    "print_job",
    "print_metrics",
    "print_rows",
    "shown",
    "waiting_reason",
    "work_line",
]

console = Console()
errors = Console(stderr=True)

# Tables show a job id's first 8 characters, as git and docker show short ids.
SHORT_ID = 8


def shown(text: object, *, lines: bool = False) -> str:
    """Text from the network or a file, safe to print through rich.

    With `lines`, newlines are kept, for a log tail printed as lines on purpose.
    """
    return "\n".join(escape(line) for line in escape_control(text, lines=lines).split("\n"))


def dump(obj: Any) -> None:
    """One JSON value on a line of stdout (`--json`)."""
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()


def say_ready(json_: bool, obj: dict[str, Any], line: str, *, soft_wrap: bool = False) -> None:
    """A service's ready signal: `obj` as JSON on stdout with `--json`, else `line` on stderr."""
    if json_:
        dump(obj)
    else:
        errors.print(shown(line), soft_wrap=soft_wrap)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr; the caller raises the returned exit."""
    errors.print(f"[red]error:[/red] {shown(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


class PlainFormatter(logging.Formatter):
    """Log lines with control characters escaped: a message may quote a request or a job's output."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return escape_control(super().formatException(ei), lines=True)

    def formatStack(self, stack_info: str) -> str:
        return escape_control(super().formatStack(stack_info), lines=True)


def print_rows(
    title: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]], *, no_wrap: tuple[str, ...] = ()
) -> None:
    """A table whose every cell is text from elsewhere, escaped."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, no_wrap=column in no_wrap)
    for row in rows:
        table.add_row(*(shown(cell) for cell in row))
    console.print(table)


def print_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    table = Table(title="metrics")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for task, values in metrics.items():
        for name, value in values.items():
            table.add_row(shown(task), shown(name), f"{value:.4g}" if isinstance(value, float) else shown(value))
    console.print(table)


def print_job(info: JobInfo) -> None:
    """A job's record as `evalq status` shows it: its fields, its pieces, its metrics."""
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows: list[tuple[str, Any]] = [
        ("job", info.job_id),
        ("status", info.status),
        ("pool", info.pool),
        ("team", info.team),
        ("user", info.user),
        ("position", info.position_in_queue),
        ("waiting", waiting_reason(info.waiting) if info.status == "queued" else None),
        ("attempts", info.attempts),
        ("worker", info.worker),
        ("created", info.created_at),
        ("started", info.started_at),
        ("finished", info.completed_at),
        ("labels", ", ".join(f"{k}={v}" for k, v in info.labels.items()) or None),
        ("model", info.request.model if info.request else None),
        ("tasks", ",".join(info.request.tasks) if info.request else None),
        ("rescore of", info.request.rescore_of if info.request else None),
        ("progress", f"{info.progress.phase} {info.progress.done}/{info.progress.total}" if info.progress else None),
        ("stalled", f"no progress since {info.stalled_since}" if info.stalled_since else None),
        ("pieces", f"{info.shards_done}/{info.shards} done" if info.pieces else None),
        ("work", work_line(info.result.work) if info.result and info.result.work else None),
        ("error", info.error),
    ]
    for key, value in rows:
        if value is not None:
            table.add_row(key, shown(value))
    console.print(table)
    if info.pieces:
        pieces = []
        for piece in info.pieces:
            span = "" if piece.offset is None else f" [{piece.offset}, {piece.offset + (piece.limit or 0)})"
            pieces.append(
                (
                    str(piece.index + 1),
                    ",".join(piece.tasks) + span,
                    f"{piece.done}/{piece.docs}",
                    piece.status,
                    str(piece.attempts),
                    piece.worker or "",
                    "" if piece.seconds is None else f"{piece.seconds:.1f}",
                )
            )
        print_rows("pieces", ("piece", "tasks", "documents", "status", "attempts", "worker", "seconds"), pieces)
    if info.result and info.result.metrics:
        print_metrics(info.result.metrics)


def waiting_reason(why: str | None) -> str:
    """Why a queued job waits, as `status` and `queue` show it: the first has only a worker to wait for."""
    return why or "for a free worker"


def work_line(work: Work) -> str:
    """Where an evaluation's answers came from, as `evalq status` and `--wait` show it."""
    return (
        f"responses {work.responses_computed} computed, {work.responses_resumed} resumed, "
        f"{work.responses_reused} reused; scores {work.scores_computed} computed, {work.scores_reused} reused"
    )


def event_line(event: Event) -> str:
    """One event as `evalq events` prints it (unescaped: the caller shows it)."""
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
    elif isinstance(event, Stalled):
        detail = f"no progress for {event.seconds:.0f}s (since {event.since}), {event.action}"
    elif isinstance(event, ShardStarted):
        detail = f"piece {event.shard + 1}/{event.shards}"
    elif isinstance(event, ShardCompleted):
        detail = f"piece {event.shard + 1} in {event.seconds}s"
    elif isinstance(event, ShardFailed):
        detail = f"piece {event.shard + 1}: {event.error}"
    elif isinstance(event, Tracked):
        detail = "in " + (", ".join(event.trackers) or "no tracker")
    elif isinstance(event, Started):
        detail = "no model loaded" if not event.loads_model else ("weights swapped" if event.weights_swapped else "")
    labels = " ".join(f"{k}={v}" for k, v in event.labels.items())
    return f"{event.time} {event.job_id} {kind:<9} {event.worker or '-'} {detail} {labels}".rstrip()
