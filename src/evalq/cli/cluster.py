"""The commands about the queue itself: setup, health, workers, teams, tasks, models."""

from __future__ import annotations

import re
from typing import Annotated, Any, Optional

import msgspec
import typer

from ..connection import connect
from ..fields import Priority
from ..policy import PoolPolicy, SetupChange, apply_setup, revised
from ..publisher import AsyncClient
from ..schemas import CacheMode, Health, TeamUse
from .app import JsonOpt, client_command, run, settings
from .output import console, dump, errors, print_rows, shown

__all__ = ["health", "models", "setup", "tasks", "teams", "version_skew", "workers"]


def setup(
    ctx: typer.Context,
    pool: Annotated[list[str], typer.Option(help="A pool to create or update (repeat it); default: `default`.")] = [],  # noqa: B006
    ack_wait: Annotated[
        Optional[float],
        typer.Option(
            help="Seconds before a silent job is redelivered. A lower value is applied only once every worker "
            "running a job has confirmed it renews its job at the new pace; otherwise nothing changes."
        ),
    ] = None,
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
    url_prefix: Annotated[
        list[str],
        typer.Option(
            help="Policy: URLs requests may name (an API model's or a judge's server): a prefix ending at a "
            "path boundary (`http://judge:8000`), or `*` for any (repeat it)."
        ),
    ] = [],  # noqa: B006
    default_timeout: Annotated[
        Optional[int], typer.Option(help="Policy: seconds a job without its own timeout may run (0: no limit).")
    ] = None,
    max_timeout: Annotated[
        Optional[int], typer.Option(help="Policy: the largest timeout a job may have, in seconds (0: no limit).")
    ] = None,
    stall_after: Annotated[
        Optional[int],
        typer.Option(help="Policy: seconds without progress after which a running job is stalled (0: never)."),
    ] = None,
    stall_action: Annotated[
        Optional[str],
        typer.Option(help="Policy: what a stall does: `report` (an event and a mark) or `fail` (the job fails)."),
    ] = None,
    cache: Annotated[
        Optional[CacheMode],
        typer.Option(
            help="Policy: the response cache for requests that do not choose one: `off`, `read`, `read-write` "
            "(reuse and add answers) or `refresh` (compute all and add them)."
        ),
    ] = None,
    team: Annotated[
        list[str],
        typer.Option(
            help="Scheduling: the team (a NATS account; `default` is the team of requests without accounts) "
            "the --share, --max-* options set (repeat it to set several alike). `*` sets the policy of "
            "every team not listed."
        ),
    ] = [],  # noqa: B006
    share: Annotated[
        Optional[float], typer.Option(help="Scheduling: the --team's weight in fair share (default 1).")
    ] = None,
    max_running_gpus: Annotated[
        Optional[int], typer.Option(help="Scheduling: GPUs the --team's running jobs may hold at once (0: no limit).")
    ] = None,
    max_queued: Annotated[
        Optional[int],
        typer.Option(
            help="Scheduling: jobs the --team may have queued; one more is refused (429). "
            "0: none may be submitted; -1: no limit."
        ),
    ] = None,
    max_priority: Annotated[
        Optional[Priority], typer.Option(help="Scheduling: the highest priority the --team may ask for.")
    ] = None,
    remove_team: Annotated[
        list[str],
        typer.Option(help="Scheduling: forget a team's settings; it then gets those of `*` (repeat it)."),
    ] = [],  # noqa: B006
    aging: Annotated[
        Optional[float],
        typer.Option(help="Scheduling: seconds a queued job waits for each level its priority rises (up to high)."),
    ] = None,
    half_life: Annotated[
        Optional[float],
        typer.Option(help="Scheduling: the half-life, in seconds, of a team's past GPU use in fair share."),
    ] = None,
    preempt: Annotated[
        Optional[bool],
        typer.Option(
            "--preempt/--no-preempt",
            help="Scheduling: whether a waiting high or urgent job stops a running low one (resumed later).",
        ),
    ] = None,
    reset_policy: Annotated[
        bool, typer.Option("--reset-policy", help="Policy: start from the default instead of the pool's current one.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what differs.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Lower ack_wait even if a worker running a job does not confirm it (that job may then run twice).",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create the queue's JetStream objects, or apply these queue settings and pool policies to them.

    Every other process creates what is missing and leaves what exists as it is (a difference is
    logged); this command is how the queue's settings change on purpose.

    The policy options set what requests to each `--pool` may make its workers load and how long
    their jobs may run. A list option replaces the pool's list; options not given keep the pool's
    current values. A pool never set up refuses local paths, hub ids and trust_remote_code.

    Raising `--ack-wait` takes effect at once. Lowering it (a setup whose ack_wait, given or from
    the settings, is below the consumer's) is first announced to the pool's workers: each renews
    its job and switches to the new pace, and only when every worker the registry lists as running
    a job has confirmed (within the request timeout) is the consumer changed. Otherwise nothing
    changes and the command exits 1, naming the workers and their jobs; `--force` lowers it anyway.

    Example: `evalq setup --ack-wait 30 --pool default --pool big`

    Example: `evalq setup --pool gpu --model-root /models --hub-prefix my-org --max-timeout 86400`

    Example: `evalq setup --pool ci --cache off`

    The scheduling options set a pool's fair share between teams: the team options apply to each
    `--team` given, and a team's options not given keep its current values (a team first named
    starts from share 1, no limits, up to `urgent`).

    Example: `evalq setup --pool gpu --team vision --share 2 --max-running-gpus 8 --max-queued 100`

    Example: `evalq setup --pool gpu --team '*' --max-priority high --aging 900 --half-life 7200`
    """
    chosen = settings(ctx, ack_wait=ack_wait, replicas=replicas, queue_limit=queue_limit)
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
    if url_prefix:
        changes["url_prefixes"] = url_prefix
    if stall_action is not None:
        changes["stall_action"] = stall_action
    if cache is not None:
        changes["cache"] = cache
    for name, seconds in (
        ("default_timeout_s", default_timeout),
        ("max_timeout_s", max_timeout),
        ("stall_after_s", stall_after),
    ):
        if seconds is not None:
            changes[name] = seconds or None
    scheduling = _scheduling(team, share, max_running_gpus, max_queued, max_priority, remove_team, aging, half_life)
    if preempt is not None:
        scheduling["preempt"] = preempt
    if scheduling:
        changes["scheduling"] = scheduling
    try:
        # Checked before connecting, so a bad value is a usage error and changes nothing.
        revised(PoolPolicy(), **changes)
    except (msgspec.ValidationError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="the policy options") from None

    async def main() -> list[SetupChange]:
        nc = await connect(chosen, name="evalq-setup")
        try:
            return await apply_setup(
                nc, chosen, pools, policy=changes, reset_policy=reset_policy, dry_run=dry_run, force=force
            )
        finally:
            await nc.close()

    done = run(main())
    if json_out:
        dump(done)
        return
    verb = "would change" if dry_run else "changed"
    for change in done:
        if change.setting != "policy":
            line = f"{change.object}: {change.setting} {verb} from {change.was!r} to {change.now!r}"
            console.print(shown(line), highlight=False, soft_wrap=True)
            continue
        # A policy is shown field by field (`scheduling.teams.a.share`): only what differs.
        for field, was, now in _differences(change.was, change.now):
            line = f"{change.object}: policy {field} {verb} from {was!r} to {now!r}"
            console.print(shown(line), highlight=False, soft_wrap=True)
    if not done:
        console.print(shown(f"queue {chosen.queue.prefix!r} is as configured (pools: {', '.join(pools)})"))


def _scheduling(
    teams: list[str],
    share: float | None,
    max_running_gpus: int | None,
    max_queued: int | None,
    max_priority: str | None,
    remove: list[str],
    aging: float | None,
    half_life: float | None,
) -> dict[str, Any]:
    """The scheduling options as the changes `apply_setup` merges into each pool's `scheduling`."""
    team: dict[str, Any] = {}
    if share is not None:
        team["share"] = share
    if max_running_gpus is not None:
        team["max_running_gpus"] = max_running_gpus or None
    if max_queued is not None:
        if max_queued < -1:
            raise typer.BadParameter("expected a count, 0 (none) or -1 (no limit)", param_hint="--max-queued")
        team["max_queued"] = None if max_queued == -1 else max_queued
    if max_priority is not None:
        team["max_priority"] = max_priority
    if team and not teams:
        raise typer.BadParameter("--share and the --max-* options set a team's settings: name it", param_hint="--team")
    if "*" in remove or set(remove) & set(teams):
        raise typer.BadParameter("a team to remove is `*`, or is also set", param_hint="--remove-team")
    changes: dict[str, Any] = {}
    named: dict[str, dict[str, Any] | None] = {name: dict(team) for name in teams if name != "*"}
    named.update(dict.fromkeys(remove))
    if named:
        changes["teams"] = named
    if "*" in teams and team:
        changes["default_team"] = team
    if aging is not None:
        changes["aging_s"] = aging
    if half_life is not None:
        changes["half_life_s"] = half_life
    return changes


def _differences(was: Any, now: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, was, now) for each field that differs, nested mappings walked."""
    if not (isinstance(was, dict) and isinstance(now, dict)):
        return [] if was == now else [(path, was, now)]
    found: list[tuple[str, Any, Any]] = []
    for key in {**was, **now}:
        found += _differences(was.get(key), now.get(key), f"{path}.{key}" if path else str(key))
    return found


def workers(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List live workers: host, pool, GPUs, lmms-eval version, current job.

    Example: `evalq workers --json`
    """

    async def main(client: AsyncClient) -> None:
        live = (await client.health()).workers
        if json_:
            dump(live)
            return
        rows = [
            (
                w.worker_id,
                w.host,
                w.pool,
                ", ".join(g.name for g in w.gpus) or "cpu",
                w.lmms_eval_version or "",
                "?" if w.models is None else str(len(w.models)),
                "?" if w.tasks is None else str(len(w.tasks)),
                w.current_job or "",
                w.heartbeat_at,
            )
            for w in live
        ]
        columns = ("worker", "host", "pool", "gpus", "lmms-eval", "models", "tasks", "current job", "heartbeat")
        print_rows(f"{len(live)} workers", columns, rows)

    client_command(main)(ctx)


def health(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Check the gateway: status, pools, queue size, workers, and its evalq version.

    Warns (on stderr) about each worker whose evalq differs from the gateway's in minor version.

    Example: `evalq health --json`
    """

    async def main(client: AsyncClient) -> None:
        state = await client.health()
        if json_:
            dump(state)
        else:
            console.print(
                shown(
                    f"{state.status}: pools {', '.join(state.pools)}; {state.queue_size} queued; "
                    f"{len(state.workers)} workers; evalq {state.version}"
                ),
                highlight=False,
            )
        # On stderr, so `--json` stays one object on stdout.
        for line in version_skew(state):
            errors.print(f"[yellow]warning:[/yellow] {shown(line)}", highlight=False, soft_wrap=True)

    client_command(main)(ctx)


def _minor(version: str) -> str:
    """`major.minor` of a version; the whole string when it has no such prefix."""
    match = re.match(r"\d+\.\d+", version)
    return match.group() if match else version


def version_skew(state: Health) -> list[str]:
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


def tasks(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List the tasks that live workers can run.

    Example: `evalq tasks | grep mmmu`
    """

    async def main(client: AsyncClient) -> None:
        names = await client.list_tasks()
        dump({"tasks": names}) if json_ else console.print("\n".join(shown(n) for n in names), highlight=False)

    client_command(main)(ctx)


def models(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """List the models that live workers can run.

    Example: `evalq models --json`
    """

    async def main(client: AsyncClient) -> None:
        names = await client.list_models()
        dump({"models": names}) if json_ else console.print("\n".join(shown(n) for n in names), highlight=False)

    client_command(main)(ctx)


def teams(
    ctx: typer.Context,
    pool: Annotated[list[str], typer.Option(help="Only these pools (repeat it); default: every pool.")] = [],  # noqa: B006
    json_: JsonOpt = False,
) -> None:
    """List each team's use of each pool and its limits: share, GPU-seconds used (recent use counts
    more: each job's are halved every half-life), GPUs running and queued jobs against the team's
    quotas, and the highest priority it may ask for. A team's member sees only its own rows.

    Example: `evalq teams --pool gpu`

    Example: `evalq teams --json | jq '.teams[] | select(.queued > 0)'`
    """

    async def main(client: AsyncClient) -> None:
        reply = await client.teams()
        rows = [row for row in reply.teams if not pool or row.pool in pool]
        if json_:
            dump({"teams": rows})
            return
        columns = ("pool", "team", "share", "use GPU-s", "running GPUs", "queued", "max priority")
        print_rows(f"{len(rows)} teams", columns, [_team_row(row) for row in rows])

    client_command(main)(ctx)


def _team_row(row: TeamUse) -> tuple[str, ...]:
    def of(used: int, most: int | None) -> str:
        return f"{used} / {'-' if most is None else most}"

    return (
        row.pool,
        row.team,
        f"{row.share:g}",
        f"{row.use_gpu_s:,.0f}",
        of(row.running_gpus, row.max_running_gpus),
        of(row.queued, row.max_queued),
        row.max_priority,
    )
