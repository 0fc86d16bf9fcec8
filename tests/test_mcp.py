"""`evalq mcp`, driven by the `mcp` package's own client over stdio against `evalq up` (real
lmms-eval): lmms-eval's tools with their names and shapes, evalq's own, and a restart of the
queue between `evaluate` and `get_run_result` that loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from .conftest import EVALQ, Processes
from .test_embedded import free_port, wait_until_up
from .waiting import eventually

pytestmark = pytest.mark.slow


async def call(session: ClientSession, tool: str, **args: Any) -> Any:
    result = await session.call_tool(tool, args)
    assert not result.isError, f"{tool}: {result.content}"
    return json.loads(result.content[0].text)  # type: ignore[union-attr]


def start_up(processes: Processes, home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EVALQ_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return processes.start([*EVALQ, "up", "--port", str(port), "--no-ui"], env, name="up")


async def test_lmms_evals_mcp_tools_over_a_durable_queue(tmp_path: Path, processes: Processes) -> None:
    home, port = tmp_path / "home", free_port()
    up = start_up(processes, home, port)
    url = await wait_until_up(up)
    env = {**os.environ, "EVALQ_NATS_URL": url, "EVALQ_HOME": str(tmp_path / "client")}
    server = StdioServerParameters(command=sys.executable, args=["-m", "evalq", "mcp"], env=env)
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        names = {tool.name for tool in (await session.list_tools()).tools}
        lmms_evals = {"list_tasks", "get_task_info", "list_models", "get_model_info", "evaluate"}
        assert lmms_evals | {"get_run_status", "get_run_result", "cancel_run"} <= names
        assert {"list_jobs", "compare_runs", "get_verdict"} <= names

        listed = await eventually(
            lambda: call(session, "list_tasks", query="evalq_*"),
            until=lambda r: "evalq_demo" in [t["name"] for t in r["tasks"]],
            what="evalq_demo listed by the worker",
            timeout=180,
            interval=1.0,
        )
        assert listed["query"] == "evalq_*" and listed["total"] == len(listed["tasks"])
        assert (await call(session, "get_task_info", task_name="evalq_demo"))["name"] == "evalq_demo"

        done = await call(session, "evaluate", model="dummy", tasks=["evalq_demo"], limit=4, mode="sync")
        assert done["status"] == "completed"
        assert "exact_match" in done["results"]["dummy"]["results"]["evalq_demo"]

        # Two more: the first keeps the worker busy while the second waits, and is cancelled.
        first = await call(session, "evaluate", model="dummy", tasks=["evalq_demo"], mode="async")
        second = await call(session, "evaluate", model="dummy", tasks=["evalq_demo"], mode="async")
        assert first["status"] == second["status"] == "queued" and first["run_id"] != second["run_id"]
        cancelled = await call(session, "cancel_run", run_id=second["run_id"])
        assert cancelled["success"] is True

        # The queue restarts before the result is asked for: nothing is lost.
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        up = start_up(processes, home, port)
        await wait_until_up(up)
        status = await eventually(
            lambda: call(session, "get_run_status", run_id=first["run_id"]),
            until=lambda s: s["status"] in ("completed", "failed", "cancelled"),
            what="the run ended across the restart",
            timeout=180,
            interval=1.0,
        )
        assert status["status"] == "completed", status
        result = await call(session, "get_run_result", run_id=first["run_id"], include_samples=True, sample_limit=3)
        assert result["status"] == "completed"
        section = result["results"]["dummy"]
        assert "evalq_demo" in section["results"] and 0 < len(section["samples"]) <= 3
        assert (await call(session, "get_run_status", run_id=second["run_id"]))["status"] == "cancelled"

        jobs = await call(session, "list_jobs", status=["completed"])
        assert {done["run_id"], first["run_id"]} <= {j["job_id"] for j in jobs["jobs"]}
        compared = await call(session, "compare_runs", run_a=done["run_id"], run_b=first["run_id"])
        assert any(row["metric"] == "exact_match" for row in compared["metrics"])
        missing = await session.call_tool("get_run_status", {"run_id": "00000000-0000-4000-8000-000000000000"})
        assert missing.isError and "not found" in str(missing.content[0])
