"""The commands beside a training run: track (metrics to experiment trackers), watch-dir (checkpoints to jobs)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import checkpoints, tracking
from ..errors import ConfigError, EvalqError
from ..publisher import AsyncClient
from .app import JsonOpt, number, parse_pairs, run, settings
from .output import console, dump, errors, fail, shown
from .processes import on_signals

__all__ = ["track", "watch_dir"]


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
    if wandb_mode not in ("offline", "online"):
        raise fail(f"--wandb-mode must be offline or online, got {wandb_mode!r}", 2)
    chosen = settings(ctx)
    trackers: list[tracking.Tracker] = []
    try:
        if tensorboard is not None:
            trackers.append(tracking.TensorBoardTracker(tensorboard))
        if mlflow is not None:
            trackers.append(tracking.MlflowTracker(mlflow, mlflow_experiment))
        if wandb is not None:
            trackers.append(tracking.WandbTracker(wandb, wandb_project, wandb_mode))
    except tracking.MissingExtra as exc:
        raise fail(str(exc), 2) from None
    except EvalqError as exc:
        raise fail(str(exc), 2) from None
    if not trackers:
        raise fail("name a tracker: --tensorboard DIR, --mlflow URI or --wandb DIR", 2)
    options = tracking.TrackOptions(
        name=name, step_label=step_label, run_label=run_label, from_now=from_now, max_jobs=max_jobs
    )

    def show(outcome: tracking.Outcome) -> None:
        if json_:
            dump(outcome.__dict__)
        elif outcome.skipped is not None and not outcome.trackers:
            line = f"{outcome.job_id}: skipped, it can never be logged: {outcome.skipped}"
            console.print(shown(line), highlight=False)
        elif outcome.step is None:
            console.print(shown(f"{outcome.job_id}: no {step_label!r} label, not logged"), highlight=False)
        else:
            done = ", ".join(f"{k} {v}" for k, v in outcome.trackers.items())
            why = f" ({outcome.skipped})" if outcome.skipped else ""
            line = f"{outcome.job_id}: run {outcome.run} step {outcome.step}: {done}{why}"
            console.print(shown(line), highlight=False)

    async def main() -> None:
        async with tracking.Tracking(chosen, trackers, options) as tracker:
            errors.print(shown(f"tracking completed jobs as consumer {tracker.durable}"), highlight=False)
            remove = on_signals(tracker.stop)
            try:
                await tracker.run(show)
            finally:
                remove()

    run(main())


def watch_dir(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="The folder the trainer writes checkpoints into.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated task names.")],
    pattern: Annotated[str, typer.Option(help="Checkpoint folders' names, a glob.")] = "checkpoint-*",
    model: Annotated[str, typer.Option(help="lmms-eval model name; gets model_args pretrained=<folder>.")] = (
        "huggingface"
    ),
    model_args: Annotated[
        Optional[str],
        typer.Option(help="More k=v,k=v model arguments (sent as an object; `pretrained` is always the folder)."),
    ] = None,
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
    interval: Annotated[
        float, typer.Option(help="Seconds between rescans: the safety net beside filesystem events, or the polling.")
    ] = 30.0,
    settle: Annotated[
        float, typer.Option(help="Seconds a checkpoint's files must stay unchanged before it is submitted.")
    ] = 1.0,
    events: Annotated[
        Optional[bool],
        typer.Option(
            "--events/--poll",
            help="Learn of new checkpoints from filesystem events, or by rescanning only "
            "(default: events, unless they cannot be had or the folder is on a network filesystem).",
            show_default=False,
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Scan, wait --settle seconds, scan again, submit, and exit.")
    ] = False,
    state: Annotated[
        Optional[Path], typer.Option(help="What was submitted (default $EVALQ_HOME/watch-dir/<folder hash>.json).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Submit one evaluation per new checkpoint folder, once it is complete and no longer changing.

    Filesystem events show a new checkpoint at once; it is submitted when its files have not
    changed for --settle seconds, with the label `saved_at` (its newest file's time). A rescan
    every --interval seconds finds what events missed; with --poll (or where events cannot be
    had) the rescans alone find checkpoints. A restart submits nothing twice: each
    submission's Idempotency-Key comes from the folder's path and content, and the state file
    records it.

    Example: `evalq watch-dir out/ --pattern 'checkpoint-*' --tasks mmmu_val --limit 100 --label run=exp1 --settle 2`

    Example, where other machines write checkpoints: `evalq watch-dir /nfs/exp1 --tasks mmmu_val --poll --interval 5`
    """
    if not interval > 0:
        raise fail(f"--interval must be more than 0 seconds, got {interval}", 2)
    request: dict[str, Any] = {"model": model, "tasks": [t for t in tasks.split(",") if t], "pool": pool}
    request["labels"] = parse_pairs(label, "--label")
    optional = {"model_args": model_args, "limit": number(limit), "batch_size": number(batch_size), "device": device}
    request.update({k: v for k, v in optional.items() if v is not None})
    chosen = settings(ctx)

    def show(checkpoint: checkpoints.Checkpoint) -> None:
        if json_:
            dump(checkpoint.__dict__)
        else:
            dup = " (already submitted)" if checkpoint.duplicate else ""
            console.print(
                shown(f"submitted {checkpoint.job_id}{dup} for {checkpoint.path} (step {checkpoint.step})"),
                highlight=False,
            )

    def started(line: str) -> None:
        errors.print(shown(line), highlight=False, soft_wrap=True)  # one line in a log, however long

    async def main() -> None:
        async with AsyncClient(chosen) as client:
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
                    settle=settle,
                    events=events,
                )
                watcher.candidates()
            except EvalqError as exc:
                raise fail(str(exc), 2) from None
            stop = asyncio.Event()
            remove = on_signals(stop.set)
            try:
                # A refused folder is logged (escaped) by the watcher, which goes on.
                await watcher.run(interval, stop, show, passes=2 if once else None, on_start=started)
            except ConfigError as exc:  # --events where they cannot be had
                raise fail(str(exc), 2) from None
            finally:
                remove()

    run(main())
