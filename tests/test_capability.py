"""A worker that cannot run a job hands it on to one that can, and fails it only when none can."""

from __future__ import annotations

import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.registry import cannot_run
from evalq.schemas import TERMINAL, EvaluateRequest, JobInfo, Started, WorkerInfo
from evalq.topology import Topology

from .events import all_events
from .jobs import FAKE, JOB, enqueue_unchecked
from .waiting import eventually

WORKER = WorkerInfo(worker_id="w", host="h", pid=1, models=["dummy"], tasks=["evalq_demo"], gpu_count=0)


def test_cannot_run_names_what_is_missing() -> None:
    assert cannot_run(WORKER, EvaluateRequest(model="dummy", tasks=["evalq_demo"])) is None
    assert "model 'llava'" in (cannot_run(WORKER, EvaluateRequest(model="llava", tasks=["evalq_demo"])) or "")
    assert "task other" in (cannot_run(WORKER, EvaluateRequest(model="dummy", tasks=["evalq_demo", "other"])) or "")
    assert "num_gpus=2" in (cannot_run(WORKER, EvaluateRequest(model="dummy", tasks=["evalq_demo"], num_gpus=2)) or "")
    unlisted = WorkerInfo(worker_id="w", host="h", pid=1)
    assert cannot_run(unlisted, EvaluateRequest(model="x", tasks=["y"], num_gpus=8)) is None, "no inventory: no refusal"


def task_folder(root: Path, name: str) -> Path:
    """A copy of the bundled demo task under another name, as a team's own task folder."""
    source = Path(str(resources.files("evalq") / "tasks" / "evalq_demo"))
    folder = root / name
    folder.mkdir(parents=True)
    shutil.copyfile(source / "evalq_demo.jsonl", folder / f"{name}.jsonl")
    shutil.copyfile(source / "utils.py", folder / "utils.py")
    template = (source / "evalq_demo.yaml.in").read_text().replace("task: evalq_demo", f"task: {name}")
    (folder / f"{name}.yaml").write_text(template.replace("@DATA_FILE@", str(folder / f"{name}.jsonl")))
    return root


async def ended(client: AsyncClient, job_id: str, timeout: float = 120) -> JobInfo:
    return await eventually(
        lambda: client.get_job(job_id),
        until=lambda info: info.status in TERMINAL,
        timeout=timeout,
        what=f"job {job_id} to end",
        interval=0.2,
    )


@pytest.mark.slow
async def test_a_job_goes_to_the_worker_that_can_run_it(
    client: AsyncClient,
    worker_factory: Any,
    tmp_path: Path,
    nc: Any,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="evalq.worker")
    plain = await worker_factory(evaluator=FAKE, advertise_inventory=True)
    extra = await worker_factory(
        evaluator=FAKE, advertise_inventory=True, task_paths=[str(task_folder(tmp_path / "tasks", "team_task"))]
    )
    await eventually(
        client.health,
        until=lambda health: len([w for w in health.workers if w.tasks]) >= 2,
        timeout=240,  # both take their inventory, on 2 shared cores
        what="both workers to list their inventory",
        interval=0.5,
    )

    # Keep the able worker busy, so that the other one takes the next jobs first.
    busy = await client.submit(**{**JOB, "tasks": ["team_task"], "limit": 60})
    waiting = [(await client.submit(**{**JOB, "tasks": ["team_task"], "limit": 2})).job_id for _ in range(2)]
    for job_id in [busy.job_id, *waiting]:
        info = await ended(client, job_id)
        assert (info.status, info.worker, info.attempts) == ("completed", extra.worker.worker_id, 1), info.error
        started = [e for e in await all_events(client, job_id) if isinstance(e, Started)]
        assert [s.worker for s in started] == [extra.worker.worker_id]
    assert "handing it back" in caplog.text, "the worker without the task never took one of its jobs"

    # With the able worker gone, a job for its task (queued before it left) fails with why.
    await extra.stop()
    orphan = await enqueue_unchecked(nc, topology, {**JOB, "tasks": ["team_task"], "limit": 2})
    info = await ended(client, orphan)
    assert info.status == "failed"
    assert "no live worker of pool 'default' can run it" in (info.error or "")
    assert plain.worker.worker_id in (info.error or "") and "team_task" in (info.error or "")
