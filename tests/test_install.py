"""What a user's install shows: the version, the line naming a missing extra, text printed as text.

The full client-only install (a wheel in a fresh venv without extras) is checked by
`make client-check` (scripts/client-install-check.sh); these tests are the fast part.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import evalq
from evalq import AsyncClient
from evalq.cli import output
from evalq.config import Settings
from evalq.extras import missing_for
from evalq.schemas import WorkerInfo, now
from evalq.topology import Topology
from evalq.worker.registration import Registration

from .conftest import EVALQ, run_command, settings_env

# `evalq` as an install without the extra would run it: `import lmms_eval`/`torch` fail
# (a None in sys.modules is Python's own "not installed" mark, which find_spec honours),
# and no nats-server is beside this Python.
WITHOUT = """
import sys
for name in sys.argv.pop(1).split(","):
    if name:
        sys.modules[name] = None
sys.executable = "/nonexistent/bin/python"
from evalq.cli import main
sys.argv[0] = "evalq"
main()
"""


def _path_without_nats_server() -> str:
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "nats-server").exists())


@pytest.mark.parametrize(
    ("command", "hidden", "install"),
    [
        ("worker", "lmms_eval", "pip install 'evalq[worker]'"),
        ("worker", "torch", "pip install 'evalq[worker]'"),
        ("up", "lmms_eval,torch", "pip install 'evalq[worker]'"),
        ("up", "", "pip install 'evalq[server]'"),
        ("server", "", "pip install 'evalq[server]'"),
        ("ui", "starlette", "pip install 'evalq[ui]'"),
    ],
)
async def test_a_missing_extra_is_one_line_with_the_install_command(
    settings: Settings, command: str, hidden: str, install: str
) -> None:
    # An unreachable server: the extra is named before anything tries to connect.
    env = settings_env(settings.with_(nats_url=["nats://127.0.0.1:1"]), PATH=_path_without_nats_server())
    code, out, err = await run_command([sys.executable, "-c", WITHOUT, hidden, command], env, timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert out == "" and len(lines) == 1, err
    assert lines[0].startswith("error: ") and lines[0].endswith(install), lines[0]
    for name in filter(None, hidden.split(",")):
        assert name in lines[0]
    assert "NATS" not in lines[0] and "4222" not in lines[0]


@pytest.mark.parametrize("command", ["server", "worker", "up", "ui"])
def test_nothing_is_missing_in_the_dev_install(command: str) -> None:
    assert missing_for(command) is None


async def test_version_flag_prints_the_package_version(settings: Settings) -> None:
    code, out, _ = await run_command([*EVALQ, "--version"], settings_env(settings), timeout=60)
    assert code == 0 and out.strip() == f"evalq {evalq.__version__}"


async def test_gateway_reports_its_version_in_the_service_info(
    settings: Settings, nc: Any, topology: Topology, client: AsyncClient
) -> None:
    reply = await nc.request(f"$SRV.INFO.{topology.service_name}", b"", timeout=10)
    info = json.loads(reply.data)
    assert info["name"] == topology.service_name and info["version"] == evalq.__version__


async def _register(nc: Any, topology: Topology, **fields: Any) -> None:
    """An entry in the workers bucket, written the way a worker writes its own."""
    info = WorkerInfo(host="elsewhere", pid=1, started_at=now(), **fields)
    await Registration(nc, topology.workers_bucket, info, heartbeat=60, timeout=10).put(current_job=None)


async def test_health_warns_when_a_worker_differs_in_minor_version(
    settings: Settings, nc: Any, topology: Topology, client: AsyncClient
) -> None:
    major, minor = evalq.__version__.split(".")[:2]
    await _register(nc, topology, worker_id="same-minor", version=f"{major}.{minor}.999")
    await _register(nc, topology, worker_id="before-versions")  # an entry from before the field
    code, out, err = await run_command([*EVALQ, "health"], settings_env(settings, COLUMNS="400"), timeout=60)
    assert code == 0 and f"evalq {evalq.__version__}" in out
    assert "warning" not in err, err
    other = f"{major}.{int(minor) + 1}.0"
    await _register(nc, topology, worker_id="newer-minor", version=other)
    code, out, err = await run_command([*EVALQ, "health", "--json"], settings_env(settings, COLUMNS="400"), timeout=60)
    assert code == 0 and json.loads(out)["version"] == evalq.__version__
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "newer-minor" in warnings[0] and other in warnings[0], err


# Brackets from outside the program are text, not rich markup.
RED = "[red]urgent[/red]"


async def test_labels_and_task_names_with_markup_are_printed_as_text(
    settings: Settings, nc: Any, topology: Topology, client: AsyncClient
) -> None:
    env = settings_env(settings, COLUMNS="400")
    code, out, err = await run_command(
        [*EVALQ, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--label", f"note={RED}", "--json"], env
    )
    assert code == 0, err
    job = json.loads(out)["job_id"]
    for argv in (["status", job], ["queue"], ["events", "--job", job, "--history", "--count", "1"]):
        code, out, err = await run_command([*EVALQ, *argv], env)
        assert code == 0, err
        assert f"note={RED}" in out, (argv, out)
    # The gateway refuses the name; its error's brackets (the pattern, the path) stay whole.
    code, _, err = await run_command([*EVALQ, "submit", "--model", "dummy", "--tasks", "[red]x"], env)
    assert code == 1 and "[A-Za-z0-9_." in err and "$.tasks[0]" in err, err
    # The CLI's own refusals quote the argument as given.
    code, _, err = await run_command([*EVALQ, "submit", "--model", "dummy", "--tasks", "t", "--label", RED], env)
    assert code == 2 and f"--label expects k=v, got '{RED}'" in err, err
    # Task names that workers advertise reach `evalq tasks` as they are.
    await _register(nc, topology, worker_id="w-markup", version=evalq.__version__, tasks=["[red]", "[red]t"])
    code, out, err = await run_command([*EVALQ, "tasks"], env)
    assert code == 0, err
    assert out.split() == ["[red]", "[red]t"]


def test_metric_tables_print_task_names_as_text(monkeypatch: pytest.MonkeyPatch) -> None:
    # Task and metric names come from the evaluator's results file.
    out = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=out, width=200))
    output.print_metrics({"[red]task": {"[red]metric": "[red]n/a", "acc": 0.5}})
    text = out.getvalue()
    assert "[red]task" in text and "[red]metric" in text and "[red]n/a" in text and "0.5" in text
