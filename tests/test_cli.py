"""The `evalq` command through its real entry point, in subprocesses."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.jobstore import JobStore
from evalq.policy import load_policy
from evalq.schemas import Completed, Requeued, Started, Work, encode, now
from evalq.topology import Topology

from .checkpoint_job import LOGGED, NOT_LOGGED, TURNAROUND, checkpoint_job
from .conftest import EVALQ, run_command, settings_env
from .events import all_events
from .fake_evaluator import HOSTILE
from .jobs import FAKE, JOB, mark_completed


async def evalq(settings: Settings, *args: str, timeout: float = 120, **env: str) -> tuple[int, str, str]:
    return await run_command([*EVALQ, *args], settings_env(settings, **env), timeout)


async def test_unreachable_server_is_one_line_with_a_hint(settings: Settings) -> None:
    code, _, err = await evalq(settings.with_(nats_url=["nats://127.0.0.1:1"]), "queue")
    assert code == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "evalq up" in lines[0] and "EVALQ_NATS_URL" in lines[0]


async def test_invalid_request_names_the_field(settings: Settings, client: AsyncClient) -> None:
    code, _, err = await evalq(settings, "submit", "--model", "dummy", "--tasks", "ok,bad name")
    assert code == 1
    assert "$.tasks[1]" in err and "Traceback" not in err
    code, _, err = await evalq(settings, "submit", "--model", "dummy", "--tasks", "t", "--label", "oops")
    assert code == 2 and "--label" in err


async def test_json_output_parses(settings: Settings, client: AsyncClient) -> None:
    code, out, _ = await evalq(
        settings, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--label", "epoch=2", "--json"
    )
    assert code == 0
    accepted = json.loads(out)
    assert accepted["status"] == "queued" and accepted["position_in_queue"] == 0
    job = accepted["job_id"]
    code, out, _ = await evalq(settings, "status", job, "--json")
    assert code == 0 and json.loads(out)["labels"] == {"epoch": "2"}
    code, out, _ = await evalq(settings, "queue", "--json")
    assert code == 0 and json.loads(out)["queued_jobs"] == {"default": [job]}
    code, out, _ = await evalq(settings, "health", "--json")
    assert code == 0 and json.loads(out)["status"] == "healthy"
    code, out, _ = await evalq(settings, "cancel", job, "--json")
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, out, _ = await evalq(settings, "events", "--history", "--count", "2", "--json")
    assert code == 0 and [json.loads(line)["type"] for line in out.splitlines()] == ["queued", "cancelled"]
    code, _, err = await evalq(settings, "status", "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e")
    assert code == 1 and "404" in err


@pytest.mark.parametrize(("mode", "expected"), [("ok", 0), ("fail", 1)])
async def test_watch_exit_codes(
    settings: Settings,
    client: AsyncClient,
    worker_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    expected: int,
) -> None:
    monkeypatch.setenv("FAKE_EVAL_MODE", mode)
    await worker_factory(evaluator=FAKE)
    code, out, err = await evalq(
        settings, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--limit", "3", "--wait"
    )
    assert code == expected, err
    if mode == "ok":
        assert "exact_match" in out and "0.6" in out
    else:
        assert "failed" in err


async def test_watch_a_cancelled_job_exits_3(settings: Settings, client: AsyncClient) -> None:
    job = (await client.submit(model="dummy", tasks=["evalq_demo"])).job_id
    await client.cancel_job(job)
    code, _, err = await evalq(settings, "watch", job)
    assert code == 3 and "cancelled" in err
    code, out, _ = await evalq(settings, "watch", job, "--json")
    assert code == 3 and json.loads(out.splitlines()[-1])["type"] == "cancelled"


async def test_results_and_workers(
    settings: Settings, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    await worker_factory(evaluator=FAKE)
    info = await client.submit_and_wait(model="dummy", tasks=["evalq_demo"], limit=2, timeout=60)
    code, out, _ = await evalq(settings, "results", info.job_id, "-o", str(tmp_path), "--json")
    assert code == 0
    assert {Path(f).name for f in json.loads(out)["files"]} == {"results.json", "eval.log"}
    code, out, _ = await evalq(settings, "workers", "--json")
    assert code == 0 and len(json.loads(out)) == 1


# Any control character but the newline between lines: the CLI prints none it was sent.
RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
# HOSTILE as the CLI shows it: each control character written out, the markup as text.
SHOWN = r"\x1b]0;pwned\x07 [bold red]not markup[/bold red] \x00 \x9b2J \x1bc end"


def assert_shown_escaped(output: str) -> None:
    assert not RAW_CONTROL.search(output), repr(output)
    assert SHOWN in output, output


async def test_a_failed_jobs_output_is_printed_escaped(
    settings: Settings, client: AsyncClient, worker_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EVAL_MODE", "hostile")
    await worker_factory(evaluator=FAKE)
    wide = {"COLUMNS": "400"}  # no wrapping inside the line looked for
    code, out, err = await evalq(
        settings, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--limit", "2", "--wait", **wide
    )
    assert code == 1, err
    assert_shown_escaped(out + err)
    assert f"last {SHOWN}" in err.splitlines()[-1]  # the log tail keeps its lines, escaped inside each
    accepted = re.search(r"accepted (\S+)", out)
    assert accepted is not None, out
    job = accepted.group(1)
    info = await client.get_job(job)
    assert info.status == "failed" and info.error is not None and HOSTILE in info.error
    code, out, err = await evalq(settings, "status", job, **wide)
    assert code == 0, err
    assert_shown_escaped(out)
    count = len(await all_events(client, job))
    code, out, err = await evalq(settings, "events", "--job", job, "--history", "--count", str(count), **wide)
    assert code == 0, err
    assert_shown_escaped(out)
    assert len(out.splitlines()) == count  # one line per event: none forged
    code, out, err = await evalq(settings, "watch", job, **wide)
    assert code == 1
    assert_shown_escaped(err)


async def test_labels_and_reasons_from_older_records_are_printed_escaped(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    # The gateway now refuses such labels; a record or event written before it did is
    # still shown, escaped.
    job = (await client.submit(**JOB)).job_id
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    await jobs.transition(job, lambda info: msgspec.structs.replace(info, labels={"note": HOSTILE + "\nforged"}))
    event = Requeued(job_id=job, time=now(), reason=HOSTILE, labels={"note": "\r\nforged line"})
    await nc.jetstream().publish(topology.event_subject(job, "requeued", team="default"), encode(event))
    wide = {"COLUMNS": "400"}
    code, out, err = await evalq(settings, "status", job, **wide)
    assert code == 0, err
    assert_shown_escaped(out)
    assert SHOWN + r"\x0aforged" in out
    code, out, err = await evalq(settings, "events", "--job", job, "--history", "--count", "2", **wide)
    assert code == 0, err
    assert_shown_escaped(out)
    assert len(out.splitlines()) == 2 and r"note=\x0d\x0aforged line" in out
    code, out, err = await evalq(settings, "queue", **wide)
    assert code == 0, err
    assert not RAW_CONTROL.search(out) and r"\x0aforged" in out


def every_command() -> list[list[str]]:
    """Every command and subcommand of `evalq`, as the app declares them."""
    import typer

    from evalq.cli import app

    root: Any = typer.main.get_command(app)
    found: list[list[str]] = []
    for name, command in sorted(root.commands.items()):
        subcommands = getattr(command, "commands", None)  # a group: `evalq gate`, `evalq notify`
        found += [[name, sub] for sub in sorted(subcommands)] if subcommands else [[name]]
    assert len(found) > 20
    return found


@pytest.mark.parametrize("command", every_command(), ids=" ".join)
async def test_every_command_has_help_with_an_example(settings: Settings, command: list[str]) -> None:
    code, out, _ = await evalq(settings, *command, "--help")
    assert code == 0 and "Example" in out


async def test_setup_is_how_queue_settings_change(settings: Settings, nc: Any, topology: Any) -> None:
    js = nc.jetstream()
    code, out, _ = await evalq(settings, "setup", "--ack-wait", "7", "--dry-run", "--json")
    assert code == 0
    assert json.loads(out) == [
        {"object": f"consumer {stream}/{topology.consumer}", "setting": "ack_wait", "was": 5.0, "now": 7.0}
        for stream in (topology.work_stream("default"), topology.pieces_stream("default"))
    ]
    assert (await js.consumer_info(topology.work_stream("default"), topology.consumer)).config.ack_wait == 5.0
    code, out, _ = await evalq(settings, "setup", "--ack-wait", "7")
    assert code == 0 and "ack_wait changed from 5.0 to 7.0" in out
    assert (await js.consumer_info(topology.work_stream("default"), topology.consumer)).config.ack_wait == 7.0
    code, out, _ = await evalq(settings, "setup", "--ack-wait", "7")
    assert code == 0 and "as configured" in out
    # Lowering it asks the workers running a job first; with none, there is no one to ask.
    code, out, err = await evalq(settings, "setup", "--ack-wait", "5")
    assert code == 0 and "ack_wait changed from 7.0 to 5.0" in out, err
    assert (await js.consumer_info(topology.work_stream("default"), topology.consumer)).config.ack_wait == 5.0
    code, out, _ = await evalq(settings, "setup", "--help")
    assert code == 0 and "--force" in out


async def test_rescore_and_the_work_status_shows(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    code, _, err = await evalq(settings, "rescore", "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e")
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error:") and "404" in err and "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e" in err
    code, _, err = await evalq(settings, "rescore", "fedcba98")
    assert code == 1 and "Traceback" not in err and "no job id starts with fedcba98" in err

    source = (await client.submit(**JOB, labels={"step": "300"})).job_id
    code, _, err = await evalq(settings, "rescore", source)
    assert code == 1 and "409" in err and "only a completed job" in err and "Traceback" not in err
    work = Work(responses_computed=120, responses_resumed=380, scores_computed=120, scores_reused=380)
    await mark_completed(nc, topology, source, work)
    wide = {"COLUMNS": "400"}
    code, out, err = await evalq(settings, "status", source, **wide)
    assert code == 0, err
    shown = "responses 120 computed, 380 resumed, 0 reused; scores 120 computed, 380 reused"
    assert re.search(rf"\bwork +{shown}", out), out
    assert "rescore of" not in out

    code, out, err = await evalq(settings, "rescore", source[:8], "--json")
    assert code == 0, err
    accepted = json.loads(out)
    info = await client.get_job(accepted["job_id"])
    assert info.request is not None and info.request.rescore_of == source and info.labels == {"step": "300"}
    code, out, err = await evalq(settings, "rescore", source, "--tasks", "evalq_demo,nope", **wide)
    assert code == 1 and "$.tasks[1]" in err, err
    code, out, err = await evalq(settings, "rescore", source, "--label", "scorer=v2", **wide)
    assert code == 0, err
    new = re.search(r"accepted (\S+) .*\(re-score of (\S+), stream seq", out)
    assert new is not None and new.group(2) == source, out
    code, out, err = await evalq(settings, "status", new.group(1), **wide)
    assert code == 0 and re.search(rf"\brescore of +{source}", out) and "scorer=v2" in out, out


async def test_watch_says_what_a_job_resumed_and_where_its_answers_came_from(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    job = (await client.submit(**JOB)).job_id
    await mark_completed(nc, topology, job)
    work = Work(responses_resumed=20, scores_computed=20)
    for event in (
        Started(job_id=job, time=now(), attempt=1, worker="w1", loads_model=False, resumed_responses=20),
        Completed(job_id=job, time=now(), attempt=1, worker="w1", duration_s=1.0, work=work),
    ):
        await nc.jetstream().publish(
            topology.event_subject(job, type(event).__struct_config__.tag, team="default"), encode(event)
        )
    code, out, err = await evalq(settings, "watch", job, COLUMNS="400")
    assert code == 0, err
    assert "started  on w1 (attempt 1), no model loaded, resuming 20 responses and 0 scores" in out, out
    assert "work: responses 0 computed, 20 resumed, 0 reused; scores 20 computed, 0 reused" in out, out


async def test_submit_takes_a_cache_mode_and_a_seed(settings: Settings, client: AsyncClient) -> None:
    code, _, err = await evalq(settings, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--cache", "bogus")
    assert code == 2 and "--cache" in err
    code, out, err = await evalq(
        settings, "submit", "--model", "dummy", "--tasks", "evalq_demo", "--cache", "refresh", "--seed", "7", "--json"
    )
    assert code == 0, err
    info = await client.get_job(json.loads(out)["job_id"])
    assert info.request is not None and (info.request.cache, info.request.seed) == ("refresh", 7)


async def test_setup_sets_the_pools_cache_default(settings: Settings, nc: Any, topology: Topology) -> None:
    code, out, err = await evalq(settings, "setup", "--cache", "off", "--json")
    assert code == 0, err
    (change,) = json.loads(out)
    assert (change["setting"], change["was"]["cache"], change["now"]["cache"]) == ("policy", "read-write", "off")
    assert (await load_policy(nc.jetstream(), topology, "default")).cache == "off"
    code, _, err = await evalq(settings, "setup", "--cache", "sometimes")
    assert code == 2 and "--cache" in err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("argv", "keys"),
    [
        (["server", "--port", "{port}", "--store-dir", "{tmp}/store"], {"url", "store"}),
        (["gateway"], {"prefix", "nats_url"}),
        (["ui", "--port", "0"], {"url", "lmms_eval_api"}),
    ],
)
async def test_a_service_says_it_is_ready_in_one_json_object(
    settings: Settings, topology: Topology, tmp_path: Path, argv: list[str], keys: set[str]
) -> None:
    args = [arg.format(port=free_port(), tmp=tmp_path) for arg in argv]
    proc = await asyncio.create_subprocess_exec(
        *EVALQ,
        *args,
        "--json",
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60) if proc.stdout else b""
        ready = json.loads(line)
        assert set(ready) == keys, ready
        if "url" in ready:
            assert ready["url"].startswith(("nats://127.0.0.1:", "http://127.0.0.1:"))
        proc.terminate()
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert out == b"", out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_status_shows_a_checkpoints_turnaround(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology
) -> None:
    job = await checkpoint_job(client, nc, topology)
    code, out, err = await evalq(settings, "status", job, "--json")
    assert code == 0, err
    assert json.loads(out)["turnaround"] == TURNAROUND
    code, out, err = await evalq(settings, "status", job[:8], COLUMNS="400")
    assert code == 0, err
    assert re.search(rf"\bturnaround +{re.escape(LOGGED)}", out), out

    # Not logged yet: the total runs to the completion.
    pending = await checkpoint_job(client, nc, topology, logged=False)
    code, out, err = await evalq(settings, "status", pending, COLUMNS="400")
    assert code == 0 and re.search(rf"\bturnaround +{re.escape(NOT_LOGGED)}", out), out

    # A job with no save time has none.
    other = (await client.submit(**JOB, labels={"step": "400"})).job_id
    code, out, err = await evalq(settings, "status", other, "--json")
    assert code == 0 and json.loads(out)["turnaround"] is None, err
    code, out, err = await evalq(settings, "status", other)
    assert code == 0 and "turnaround" not in out, err
