"""`evalq notify`: a team's webhooks, and the deliveries that failed."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..publisher import AsyncClient
from ..schemas import SubscriptionView
from .app import JsonOpt, client_command, parse_pairs
from .output import console, dump, shown

__all__ = ["notify_app"]

notify_app = typer.Typer(
    name="notify",
    help="Webhooks: POST your team's job endings and verdicts to a URL, signed, at least once.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)


def _subscriptions_table(rows: list[SubscriptionView]) -> None:
    table = Table("name", "url", "on", "labels", "format")
    for row in rows:
        labels = " ".join(f"{k}={v}" for k, v in row.labels.items())
        table.add_row(shown(row.name), shown(row.url), ",".join(row.on), shown(labels), row.format)
    console.print(table)


@notify_app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The subscription's name.")],
    url: Annotated[str, typer.Argument(help="Where to POST: loopback, or (admins) a host in `webhook_hosts`.")],
    on: Annotated[
        Optional[list[str]],
        typer.Option(help="completed, failed, cancelled, gated (any verdict) or no-go (repeatable)."),
    ] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="k=v: only jobs with this label (repeatable).")] = None,
    format: Annotated[str, typer.Option(help='json (the event) or slack ({"text": ...}).')] = "json",
    secret: Annotated[Optional[str], typer.Option(help="The signing secret (16+ characters); one is made.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Add (or replace) a webhook; prints the signing secret once.

    Example: `evalq notify add ci http://127.0.0.1:9000/hook --on completed --on no-go --label run=r1`
    """

    async def main(client: AsyncClient) -> None:
        reply = await client.notify.add(
            name, url, on=on, labels=parse_pairs(label, "--label"), format=format, secret=secret
        )
        if json_:
            dump(reply)
            return
        _subscriptions_table(reply.subscriptions)
        console.print(f"signing secret (shown once): {shown(reply.secret)}", highlight=False)

    client_command(main)(ctx)


@notify_app.command("list")
def list_(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Your team's webhooks.

    Example: `evalq notify list --json`
    """

    async def main(client: AsyncClient) -> None:
        rows = await client.notify.subscriptions()
        if json_:
            dump(rows)
        else:
            _subscriptions_table(rows)

    client_command(main)(ctx)


@notify_app.command("remove")
def remove(ctx: typer.Context, name: str, json_: JsonOpt = False) -> None:
    """Remove a webhook; deliveries still queued for it are dropped.

    Example: `evalq notify remove ci`
    """

    async def main(client: AsyncClient) -> None:
        rows = await client.notify.remove(name)
        if json_:
            dump(rows)
        else:
            _subscriptions_table(rows)

    client_command(main)(ctx)


@notify_app.command("failures")
def failures(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Deliveries whose tries ran out, kept for `evalq notify retry`.

    Example: `evalq notify failures --json`
    """

    async def main(client: AsyncClient) -> None:
        rows = await client.notify.failures()
        if json_:
            dump(rows)
            return
        table = Table("id", "subscription", "url", "tries", "error", "at")
        for row in rows:
            table.add_row(
                shown(row.id), shown(row.subscription), shown(row.url), str(row.attempts), shown(row.error), row.at
            )
        console.print(table)

    client_command(main)(ctx)


@notify_app.command("retry")
def retry(
    ctx: typer.Context,
    delivery_id: Annotated[Optional[str], typer.Argument(help="One failed delivery's id; all without.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Deliver failed deliveries again.

    Example: `evalq notify retry 3f7bc3b2-786a-46c5-9a50-2574cb77978d.completed`
    """

    async def main(client: AsyncClient) -> None:
        count = await client.notify.retry(delivery_id)
        if json_:
            dump({"retried": count})
        else:
            console.print(f"{count} deliveries queued again")

    client_command(main)(ctx)
