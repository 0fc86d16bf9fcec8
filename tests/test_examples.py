"""Each example in examples/ runs (with the stand-in evaluator: they test the client side)."""

from __future__ import annotations

import csv
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.schemas import EvaluateRequest, JobAccepted, JobInfo, JobRef, QueueStatus, decode, decode_event
from evalq.topology import Topology

from .conftest import REPO, run_command, settings_env
from .jobs import FAKE

EXAMPLES = REPO / "examples"


async def run_example(settings: Settings, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    return await run_command([sys.executable, *args], settings_env(settings), timeout)


async def test_training_loop_harvests_without_blocking(
    settings: Settings, client: AsyncClient, worker_factory: Any
) -> None:
    await worker_factory(evaluator=FAKE)
    code, out, err = await run_example(
        settings, str(EXAMPLES / "training_loop.py"), "--steps", "20", "--every", "10", "--limit", "3"
    )
    assert code == 0, err
    assert "step 10: submitted" in out and "step 20: submitted" in out
    assert out.count("{'evalq_demo': {'exact_match': 0.6}}") == 2


async def test_results_subscriber_writes_csv(
    settings: Settings, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    await worker_factory(evaluator=FAKE)
    for epoch in ("1", "2"):
        await client.submit_and_wait(model="dummy", tasks=["evalq_demo"], limit=2, labels={"epoch": epoch}, timeout=60)
    target = tmp_path / "metrics.csv"
    code, _, err = await run_example(
        settings, str(EXAMPLES / "results_to_csv.py"), str(target), "--history", "--max-jobs", "2"
    )
    assert code == 0, err
    rows = list(csv.DictReader(target.open()))
    assert len(rows) == 2
    assert {json.loads(r["labels"])["epoch"] for r in rows} == {"1", "2"}
    assert all(r["task"] == "evalq_demo" and r["metric"] == "exact_match" and float(r["value"]) == 0.6 for r in rows)


def nats_commands(script: Path) -> list[list[str]]:
    """Every `nats ...` invocation in the script, as argv, without the pipes around it."""
    commands = []
    for line in script.read_text().splitlines():
        if line.lstrip().startswith("#") or "nats " not in line:
            continue
        text = line[line.index("nats ") :]
        text = re.split(r"\s\|\s|\)$", text)[0]
        commands.append(shlex.split(text))
    return commands


async def test_nats_cli_script_speaks_the_contract(
    settings: Settings, nc: Any, client: AsyncClient, topology: Topology, worker_factory: Any, tmp_path: Path
) -> None:
    """The nats CLI cannot be installed here, so each command is replayed with a raw client."""
    await worker_factory(evaluator=FAKE)
    commands = nats_commands(EXAMPLES / "nats_cli.sh")
    assert [c[3] for c in commands] == ["req", "req", "req", "sub", "kv", "object"]
    prefix = settings.queue.prefix
    job_id = ""
    for argv in commands:
        assert argv[:3] == ["nats", "--server", "$S"]
        verb, rest = argv[3], [a for a in argv[4:] if not a.startswith("--")]
        rest = [a.replace("$JOB", job_id) for a in rest]
        if verb == "req":
            subject, body = rest
            assert subject.startswith("evalq.")
            reply = await nc.request(prefix + subject[len("evalq") :], body.encode(), timeout=10)
            assert "Nats-Service-Error-Code" not in (reply.headers or {}), reply.data
            if subject == "evalq.submit":
                decode(body, EvaluateRequest)
                job_id = decode(reply.data, JobAccepted).job_id
                # Subscribe now, as the script's `nats sub` would be waiting by the time it finishes.
                sub = await nc.subscribe(f"{prefix}.events.*.{job_id}.completed")
            elif subject == "evalq.status":
                assert decode(body, JobRef).job_id == job_id
                assert decode(reply.data, JobInfo).job_id == job_id
            else:
                assert msgspec.json.decode(body) == {}
                decode(reply.data, QueueStatus)
        elif verb == "sub":
            (subject,) = rest
            assert subject == f"evalq.events.*.{job_id}.completed"
            message = await sub.next_msg(timeout=60)
            assert decode_event(message.data).job_id == job_id
            await sub.unsubscribe()
        elif verb == "kv":
            action, bucket, key = rest
            assert (action, bucket, key) == ("get", "evalq-jobs", job_id)
            kv = await nc.jetstream().key_value(prefix + bucket[len("evalq") :])
            assert decode((await kv.get(key)).value, JobInfo).status == "completed"
        elif verb == "object":
            action, bucket, name = rest
            assert (action, bucket, name) == ("get", "evalq-results", f"{job_id}/results.json")
            store = await nc.jetstream().object_store(prefix + bucket[len("evalq") :])
            results = json.loads((await store.get(name)).data)
            assert results["results"]["evalq_demo"]["exact_match,none"] == pytest.approx(0.6)


async def test_typed_client_submits_waits_and_downloads(
    settings: Settings, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    await worker_factory(evaluator=FAKE)
    code, out, err = await run_example(
        settings, str(EXAMPLES / "typed_client.py"), "--limit", "2", "--output", str(tmp_path)
    )
    assert code == 0, err
    job = re.search(r"job (\S+) at position 0", out)
    assert job is not None, out
    assert "evalq_demo {'exact_match': 0.6}" in out and "2 files; 0 jobs waiting" in out
    assert (tmp_path / job.group(1) / "results.json").is_file()
    info = await client.get_job(job.group(1))
    assert info.status == "completed" and info.labels == {"by": "typed_client"}
