"""`evalq gate`: store a team's gate policies, and judge a completed job on demand.

The exit codes of a verdict, here and for `evalq submit --gate NAME --wait`: 0 GO,
5 NO-GO, 6 INCONCLUSIVE (1 failed, 3 cancelled, 4 timed out, 2 bad usage, as everywhere).
"""

from __future__ import annotations

from typing import Annotated, Optional

import msgspec
import typer

from ..publisher import AsyncClient
from ..publisher.gates import read_policy
from ..schemas import Verdict
from .app import JsonOpt, client_command
from .output import console, dump, shown

__all__ = ["EXIT_INCONCLUSIVE", "EXIT_NO_GO", "gate_app", "print_verdict", "verdict_code"]

EXIT_NO_GO, EXIT_INCONCLUSIVE = 5, 6

gate_app = typer.Typer(
    name="gate",
    help="Regression gates: a team's stored policies, and a verdict on a completed job.\n\n"
    "Exit codes of a verdict: 0 GO, 5 NO-GO, 6 INCONCLUSIVE.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def verdict_code(verdict: Verdict) -> int:
    return {"GO": 0, "NO-GO": EXIT_NO_GO}.get(verdict.verdict, EXIT_INCONCLUSIVE)


def print_verdict(verdict: Verdict) -> None:
    colour = {"GO": "green", "NO-GO": "red"}.get(verdict.verdict, "yellow")
    against = f" against {verdict.baseline}" if verdict.baseline else ""
    console.print(
        f"[bold {colour}]{verdict.verdict}[/bold {colour}] under gate {shown(verdict.policy)}{shown(against)}",
        highlight=False,
    )
    for rule in verdict.rules:
        line = f"  {rule.status:<21} {rule.metric} ({rule.tier})"
        if rule.value is not None:
            line += f": {rule.value:.4g}"
        if rule.baseline_value is not None and rule.delta is not None:
            line += f" vs {rule.baseline_value:.4g} (delta {rule.delta:+.4g})"
        if rule.pairs:
            line += f", {rule.pairs} pairs"
        if rule.p_value is not None:
            line += f", {rule.test} p={rule.p_value:.3g}"
        console.print(shown(f"{line}: {rule.reason}"), highlight=False)


@gate_app.command("set")
def set_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The policy's name, for `--gate NAME`.")],
    file: Annotated[str, typer.Argument(help="The policy: a TOML (.toml) or JSON file.")],
    json_: JsonOpt = False,
) -> None:
    """Store a gate policy for your team (replacing one of the same name).

    Example: `evalq gate set release gate.toml`, with gate.toml:

        baseline = "previous"
        [[rules]]
        metric = "mmmu_val/mmmu_acc"
        max_drop = 0.01
    """

    async def main(client: AsyncClient) -> None:
        stored = await client.gates.set(name, read_policy(file))
        if json_:
            dump(stored)
        else:
            console.print(f"stored gate {shown(name)}: {len(stored.rules)} rule(s), baseline {stored.baseline}")

    client_command(main)(ctx)


@gate_app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="One policy; all of your team's without.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Show your team's gate policies, or one of them.

    Example: `evalq gate show release --json`
    """

    async def main(client: AsyncClient) -> None:
        policies = {name: await client.gates.get(name)} if name else await client.gates.list()
        if json_:
            dump(policies)
            return
        if not policies:
            console.print("no gate policies stored (`evalq gate set NAME FILE`)")
        for key, policy in policies.items():
            console.print_json(msgspec.json.encode({key: policy}).decode())

    client_command(main)(ctx)


@gate_app.command("check")
def check(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="A completed job (any unique start of its id).")],
    policy: Annotated[Optional[str], typer.Option(help="Judge under this policy, not the job's own.")] = None,
    baseline: Annotated[
        Optional[str], typer.Option(help="`previous`, `best` or a job id, over the policy's baseline.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """A completed job's verdict: its stored one, or computed now under another policy or baseline.
    Exits 0 GO, 5 NO-GO, 6 INCONCLUSIVE.

    Example: `evalq gate check 3f7bc3b2 --policy release --baseline best`
    """

    async def main(client: AsyncClient) -> int:
        base = await client.resolve(baseline) if baseline not in (None, "previous", "best") else baseline
        verdict = await client.gates.check(await client.resolve(job_id), policy=policy, baseline=base)
        if json_:
            dump(verdict)
        else:
            print_verdict(verdict)
        return verdict_code(verdict)

    raise typer.Exit(client_command(main)(ctx))
