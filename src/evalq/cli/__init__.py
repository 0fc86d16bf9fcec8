"""The `evalq` command: run the services, submit and follow jobs.

Every command has `--help` with an example and `--json` for scripts. The commands live in
modules by audience (`services`, `jobs`, `gates`, `notify`, `cluster`, `training`); they are added to the app
here, in the order `evalq --help` lists them.
"""

from __future__ import annotations

from . import cluster, gates, jobs, notify, services, training
from .app import app

__all__ = ["app", "main"]

app.command()(services.server)
app.command()(cluster.setup)
app.command()(services.gateway)
app.command()(services.worker)
app.command()(services.up)
app.command()(services.ui)
app.command()(services.mcp)
app.command()(jobs.submit)
app.command()(jobs.rescore)
app.command()(jobs.status)
app.command()(jobs.cancel)
app.command()(jobs.watch)
app.command()(jobs.results)
app.command()(jobs.events)
app.command()(jobs.queue)
app.command()(jobs.jobs)
app.add_typer(gates.gate_app)
app.add_typer(notify.notify_app)
app.command()(cluster.workers)
app.command()(cluster.teams)
app.command()(cluster.health)
app.command()(cluster.tasks)
app.command()(cluster.models)
app.command()(training.track)
app.command("watch-dir")(training.watch_dir)


def main() -> None:
    app()
