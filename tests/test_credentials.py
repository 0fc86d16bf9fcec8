"""No evaluation process holds a NATS credential.

Code an evaluation runs (a task's Python, a model's remote code) could otherwise connect as
the worker and rewrite any job's record. The worker here is a real `evalq worker` process
whose credentials come the ways an operator gives them (env variables, a URL with userinfo,
a TOML config file); every process below it is checked three ways: its environment read
from /proc while it lives (the zygote, the resident model process), what a task's own code
reads of its process's environment, and what every Python interpreter started below the
worker sees at start (a `sitecustomize` on its PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path

import pytest

from evalq import AsyncClient
from evalq.config import ConnectionSettings, Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.worker.argv import scrubbed_env
from evalq.worker.runner import EvalProcess

from .conftest import Processes
from .test_auth import PASSWORDS, ROLE_SETTINGS, accounts_server, as_user
from .waiting import eventually

PASSWORD = PASSWORDS["worker"]
UI_TOKEN = "ui-token-0123456789"

# Written into every Python interpreter started below the worker (found on its PYTHONPATH):
# the environment it was started with.
SITECUSTOMIZE = """
import os
_out = os.path.join({probe!r}, "start-%d" % os.getpid())
with open(_out, "wb") as _f, open("/proc/self/environ", "rb") as _e:
    _f.write(_e.read())
"""
# Appended to the probe task's utils.py: what a task's own code can read of its process's
# environment, both as exec'd (/proc/self/environ) and as Python holds it (os.environ).
TASK_PROBE = """

import json as _json
import os as _os

_real_doc_to_text = doc_to_text


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    out = _os.path.join({probe!r}, "task-%d" % _os.getpid())
    if not _os.path.exists(out):
        with open("/proc/self/environ", "rb") as env:
            proc = env.read().decode(errors="replace")
        with open(out, "w") as f:
            _json.dump({{"proc": proc, "environ": dict(_os.environ)}}, f)
    return _real_doc_to_text(doc, lmms_eval_specific_kwargs)
"""


def _probe_task(root: Path, probe: Path) -> Path:
    """A copy of the packaged demo task, named evalq_probe, whose prompt code records its
    process's environment."""
    source = Path(str(resources.files("evalq") / "tasks" / "evalq_demo"))
    folder = root / "evalq_probe"
    folder.mkdir(parents=True)
    data = folder / "evalq_probe.jsonl"
    data.write_text("".join(source.joinpath("evalq_demo.jsonl").read_text().splitlines(keepends=True)[:6]))
    template = (source / "evalq_demo.yaml.in").read_text().replace("@DATA_FILE@", str(data))
    (folder / "evalq_probe.yaml").write_text(template.replace("task: evalq_demo", "task: evalq_probe"))
    (folder / "utils.py").write_text((source / "utils.py").read_text() + TASK_PROBE.format(probe=str(probe)))
    return root


def _descendants(root: int) -> list[int]:
    """Every live process below `root`, from /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _environ(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None  # ended meanwhile


def _names(raw: str) -> list[str]:
    return [item.split("=", 1)[0] for item in raw.split("\0") if item]


def _leaks(where: str, raw: str, environ_names: list[str] | None = None) -> list[str]:
    """What of the worker's credentials an environment holds, by value and by name."""
    found = []
    for secret in (PASSWORD, UI_TOKEN):
        if secret in raw:
            found.append(f"{where}: holds {secret!r}")
    for name in [*_names(raw), *(environ_names or [])]:
        if name.startswith(("EVALQ_", "NATS_")):
            found.append(f"{where}: holds {name}")
    return found


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A nats-server with the shipped accounts file; passwords from its environment."""
    with accounts_server(tmp_path) as server:
        yield server


@pytest.fixture
async def gateway_as_user(auth_server: EmbeddedServer, settings: Settings) -> AsyncIterator[Settings]:
    gateway_settings = as_user(settings, auth_server, "gateway")
    connection = await connect(gateway_settings)
    gateway = await Gateway(connection, gateway_settings).start()
    yield as_user(settings, auth_server, "submitter")
    await gateway.stop()
    await connection.close()


def _worker_env(server: EmbeddedServer, home: Path, tasks: Path, probe: Path, **extra: str) -> dict[str, str]:
    """The worker's credentials given every way an operator may: env variables, userinfo in
    the URL, and a TOML file named by EVALQ_CONFIG; and the password once more under a name
    evalq does not know."""
    host = server.url.split("://", 1)[1]
    config = home / "worker.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[evalq]\npassword = "{PASSWORD}"\nheartbeat = 1.0\n')
    python_path = os.pathsep.join(p for p in (str(probe.parent / "site"), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": python_path,
        "PYTHONUNBUFFERED": "1",
        "EVALQ_NATS_URL": f"nats://worker:{PASSWORD}@{host}",
        "EVALQ_USER": "worker",
        "EVALQ_PASSWORD": PASSWORD,
        "EVALQ_CONFIG": str(config),
        "EVALQ_PREFIX": "evalq",
        "EVALQ_INBOX_PREFIX": ROLE_SETTINGS["worker"]["inbox_prefix"],
        "EVALQ_HOME": str(home),
        "EVALQ_TASK_PATHS": str(tasks),
        "EVALQ_ADVERTISE_INVENTORY": "true",
        "EVALQ_UI_TOKEN": UI_TOKEN,
        "NATS_URL": f"nats://worker:{PASSWORD}@{host}",
        "NATS_PASSWORD": PASSWORD,
        "DEPLOY_QUEUE_SECRET": PASSWORD,
        **extra,
    }


@pytest.mark.slow
@pytest.mark.parametrize("warm", [True, False], ids=["zygote-and-resident", "fresh-processes"])
async def test_no_process_below_the_worker_holds_a_credential(
    auth_server: EmbeddedServer, gateway_as_user: Settings, processes: Processes, tmp_path: Path, warm: bool
) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(probe=str(probe)))
    tasks = _probe_task(tmp_path / "tasks", probe)
    env = _worker_env(auth_server, tmp_path / "home", tasks, probe, EVALQ_WARM_EVALUATOR=str(warm).lower())
    worker = processes.start([sys.executable, "-m", "evalq", "worker"], env, name="worker")
    # The check itself can see a credential where there is one: the worker's own.
    assert PASSWORD.encode() in await eventually(lambda: _environ(worker.pid), timeout=10, what="the worker")

    job = {"model": "dummy", "tasks": ["evalq_probe"]}
    async with AsyncClient(gateway_as_user) as client:
        await eventually(lambda: _listed(client), timeout=180, what="the worker listed (its inventory taken)")
        whole = await client.submit_and_wait(**job, timeout=300)
        assert whole.status == "completed", whole.error
        # Warm, its plan and merge are forked from the zygote and its pieces run on the
        # resident model; otherwise each step is a fresh process.
        sharded = await client.submit_and_wait(**job, shards=2, timeout=300)
        assert sharded.status == "completed", sharded.error

    assert worker.poll() is None, "the worker stopped"
    leaks: list[str] = []
    below = _descendants(worker.pid)
    for pid in below:
        raw = _environ(pid)
        if raw is not None:
            leaks += _leaks(f"live pid {pid}", raw.decode(errors="replace"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if PASSWORD.encode() in cmdline:
                leaks.append(f"live pid {pid}: its command line holds the password")
    started = {int(p.name.split("-")[1]): p.read_bytes().decode(errors="replace") for p in probe.glob("start-*")}
    started.pop(worker.pid)  # the worker's own interpreter: it holds them, as checked above
    for pid, raw in started.items():
        leaks += _leaks(f"interpreter {pid} at start", raw)
    seen = {int(p.name.split("-")[1]): json.loads(p.read_text()) for p in probe.glob("task-*")}
    for pid, record in seen.items():
        leaks += _leaks(f"task code in pid {pid}", record["proc"], list(record["environ"]))
        leaks += _leaks(f"task code in pid {pid} (os.environ)", "\0".join(record["environ"].values()))
    assert sorted(set(leaks)) == []

    # Each kind of process was looked at.
    assert seen, "the probe task's code never ran"
    if warm:
        assert len(below) >= 2, "expected the zygote and the resident process under the worker"
        assert started, "the zygote's interpreter"
        assert len(seen) >= 2, "expected task code in the resident process and in a forked merge"
    else:
        # The inventory's and every evaluation's own interpreter: the job, a plan, two pieces, a merge.
        assert len(started) >= 6
        assert len(seen) >= 4


async def _listed(client: AsyncClient) -> bool:
    return bool((await client.health()).workers)


async def test_a_fresh_process_gets_no_credential_whatever_its_caller_passes(tmp_path: Path) -> None:
    """A fresh evaluation process starts with the environment it is given minus every evalq
    and NATS variable, and minus any variable holding one of their secrets, whatever its name."""
    dirty = {
        **os.environ,
        **{f"EVALQ_{name.upper()}": f"value-of-{name}-{PASSWORD}" for name in ConnectionSettings.__struct_fields__},
        "EVALQ_CONFIG": str(tmp_path / "evalq.toml"),
        "EVALQ_PASSWORD": PASSWORD,
        "EVALQ_NATS_URL": f"nats://worker:{PASSWORD}@127.0.0.1:4222",
        "NATS_CREDS": str(tmp_path / "user.creds"),
        "MY_COPY": f"x{PASSWORD}x",
        "HF_HUB_OFFLINE": "1",
    }
    assert "EVALQ_TLS_KEY" in dirty and "EVALQ_NKEY_SEED" in dirty
    sleeper = shutil.which("sleep")
    assert sleeper is not None
    process = EvalProcess([sleeper, "60"], env=dirty, cwd=tmp_path, log_path=tmp_path / "eval.log")
    await process.start()
    try:
        assert process.pid is not None
        raw = _environ(process.pid)
        assert raw is not None
        text = raw.decode(errors="replace")
        assert _leaks("a fresh process", text) == []
        assert "MY_COPY" not in _names(text)
        # What lmms-eval needs is kept.
        assert "HF_HUB_OFFLINE=1" in text.split("\0") and "PATH" in _names(text)
    finally:
        await process.terminate(grace=5)
        await process.wait()
    assert scrubbed_env(scrubbed_env(dirty)) == scrubbed_env(dirty)
    # A short password is not hunted by value (it would take every variable that contains it).
    short = scrubbed_env({"EVALQ_PASSWORD": "1", "HF_HUB_OFFLINE": "1"})
    assert short.get("HF_HUB_OFFLINE") == "1" and "EVALQ_PASSWORD" not in short
