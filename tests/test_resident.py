"""The resident model: a worker keeps its last job's model loaded, reuses it for the next job
with the same model, and gives identical results to a fresh load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from evalq import AsyncClient, JobCancelled, PoolPolicy
from evalq.config import Settings
from evalq.policy import store_policy
from evalq.schemas import Started
from evalq.topology import Topology
from evalq.worker.weight_swap import SwapState

from .conftest import Processes
from .events import all_events, follow
from .jobs import JOB
from .tiny_model import build_tiny_model
from .waiting import eventually

pytestmark = pytest.mark.slow


def _tiny_job(model_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": "huggingface",
        "tasks": ["evalq_demo"],
        "model_args": {"pretrained": str(model_dir), "trust_remote_code": True, "device_map": "cpu"},
        "device": "cpu",
        # Every job asks its model: the pool's default would answer a repeated request from
        # the response cache, and the comparisons below would compare a job with itself.
        "cache": "off",
        **extra,
    }


async def _started(client: AsyncClient, job_id: str) -> Started:
    return next(e for e in await all_events(client, job_id) if isinstance(e, Started))


def _resaved(source: Path, target: Path, change: Any) -> Path:
    """A copy of the checkpoint at `source` whose tensors are `change(tensors)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    tensors = change(load_file(target / "model.safetensors"))
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _samples(files: list[Path]) -> list[dict[str, Any]]:
    path = next(p for p in files if p.name.endswith("_samples_evalq_demo.jsonl"))
    keep = ("doc_id", "target", "resps", "filtered_resps", "exact_match")
    return [{k: v for k, v in json.loads(line).items() if k in keep} for line in path.read_text().splitlines()]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_the_second_job_reuses_the_model_with_identical_results_and_another_model_releases_it(
    client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny")
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    handle = await worker_factory()
    worker = handle.worker

    first = await client.submit_and_wait(**_tiny_job(model_dir), timeout=300)
    assert first.status == "completed", first.error
    assert worker.resident is not None
    resident_pid = worker.resident.pid
    assert resident_pid is not None
    second = await client.submit_and_wait(**_tiny_job(model_dir), timeout=300)
    fresh = await client.submit_and_wait(**_tiny_job(model_dir, fresh_model=True), timeout=300)
    for info in (second, fresh):
        assert info.status == "completed", info.error

    started = [await _started(client, info.job_id) for info in (first, second, fresh)]
    assert [s.model_reused for s in started] == [False, True, False]
    assert started[0].model_load_seconds is not None and started[1].model_load_seconds is None
    assert started[2].model_load_seconds is not None
    # The reused model's metrics and samples equal a fresh load's of the same request.
    assert second.result is not None and fresh.result is not None and first.result is not None
    assert second.result.metrics == fresh.result.metrics == first.result.metrics
    reused_files = await client.results(second.job_id, tmp_path / "reused")
    fresh_files = await client.results(fresh.job_id, tmp_path / "fresh")
    assert _samples(reused_files) == _samples(fresh_files)
    # fresh_model released the first resident process; its successor now holds the model.
    assert _gone(resident_pid), "fresh_model did not release the resident process"
    assert worker.resident is not None and worker.resident.pid != resident_pid
    holder = worker.resident.pid
    assert holder is not None and not _gone(holder)

    # A job for another model releases it: the process that held the tiny model exits.
    other = await client.submit_and_wait(**{**JOB, "limit": 2}, timeout=300)
    assert other.status == "completed", other.error
    assert (await _started(client, other.job_id)).model_reused is False
    assert _gone(holder), "the resident process kept the tiny model after another model's job"


async def test_cancelling_a_job_on_a_resident_model_stops_it_and_drops_the_model(
    client: AsyncClient, worker_factory: Any
) -> None:
    handle = await worker_factory()
    warmup = await client.submit_and_wait(**{**JOB, "limit": 1}, timeout=300)
    assert warmup.status == "completed"
    resident = handle.worker.resident
    assert resident is not None and resident.pid is not None
    pid = resident.pid
    accepted = await client.submit(model="dummy", tasks=["evalq_shard_demo"], model_args="read_bytes=0")
    # Another model_args: a new resident process; cancel it the moment it starts.
    cancelled_at: list[float] = []

    async def on_event(event: Any) -> None:
        if isinstance(event, Started) and not cancelled_at:
            cancelled_at.append(time.monotonic())
            await client.cancel_job(accepted.job_id)

    await follow(client, accepted.job_id, timeout=120, on_event=on_event)
    with pytest.raises(JobCancelled):
        await client.wait_for_job(accepted.job_id, timeout=30)
    assert _gone(pid)
    current = handle.worker.resident
    assert current is None or _gone(current.pid or 0), "the cancelled job's resident model was kept"


async def test_a_killed_worker_leaves_no_resident_process(
    settings: Settings, topology: Topology, client: AsyncClient, processes: Processes
) -> None:
    worker = processes.worker(settings, EVALQ_WORKER_ID="w-resident")
    info = await client.submit_and_wait(**{**JOB, "limit": 1}, timeout=300)
    assert info.status == "completed"
    started = await _started(client, info.job_id)
    assert started.model_reused is False
    tree = psutil.Process(worker.pid).children(recursive=True)
    assert len(tree) >= 2, "expected the zygote and the resident process under the worker"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    await eventually(
        lambda: all(_gone(p.pid) for p in tree),
        timeout=20,
        what=lambda: f"the worker's children to end (left behind: {[p.pid for p in tree if not _gone(p.pid)]})",
    )


async def test_another_checkpoint_of_the_held_model_takes_the_weights_in_place_with_a_fresh_loads_results(
    client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    first = build_tiny_model(tmp_path / "step-1", seed=0)
    second = build_tiny_model(tmp_path / "step-2", seed=1)
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    handle = await worker_factory()

    a = await client.submit_and_wait(**_tiny_job(first, limit=8), timeout=300)
    assert a.status == "completed", a.error
    assert handle.worker.resident is not None
    pid = handle.worker.resident.pid
    b = await client.submit_and_wait(**_tiny_job(second, limit=8), timeout=300)
    assert b.status == "completed", b.error
    assert handle.worker.resident is not None and handle.worker.resident.pid == pid
    fresh = await client.submit_and_wait(**_tiny_job(second, limit=8, fresh_model=True), timeout=300)
    assert fresh.status == "completed", fresh.error

    started = [await _started(client, info.job_id) for info in (a, b, fresh)]
    assert [s.weights_swapped for s in started] == [False, True, False]
    assert [s.model_reused for s in started] == [False, False, False]
    assert [s.model_note for s in started] == [None, None, None]
    assert all(s.model_load_seconds is not None for s in started)
    # The swapped model answers as a fresh load of the same checkpoint does, bit for bit.
    assert b.result is not None and fresh.result is not None
    assert b.result.metrics == fresh.result.metrics
    files = {
        name: await client.results(info.job_id, tmp_path / name) for name, info in (("a", a), ("b", b), ("f", fresh))
    }
    assert _samples(files["b"]) == _samples(files["f"])
    # ... and not as the first checkpoint did: the test could tell a swap that copied nothing.
    assert _samples(files["a"]) != _samples(files["b"])
    log = next(p for p in files["b"] if p.name == "eval.log").read_text()
    assert "[evalq resident] weights swapped in" in log


async def test_a_checkpoint_that_differs_in_more_than_its_weights_is_loaded_afresh_and_says_why(
    client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    first = build_tiny_model(tmp_path / "step-1", seed=0)
    half = _resaved(first, tmp_path / "half", lambda tensors: {k: v.half() for k, v in tensors.items()})
    wider = build_tiny_model(tmp_path / "wider", seed=1, hidden=64)
    gone = "model.layers.0.mlp.up_proj.weight"
    missing = _resaved(wider, tmp_path / "missing", lambda tensors: {k: v for k, v in tensors.items() if k != gone})
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    handle = await worker_factory()

    notes: list[str | None] = []
    pids: set[int | None] = set()
    for folder in (first, half, wider, missing):
        info = await client.submit_and_wait(**_tiny_job(folder, limit=2), timeout=300)
        assert info.status == "completed", info.error
        started = await _started(client, info.job_id)
        assert started.weights_swapped is False and started.model_reused is False
        assert started.model_load_seconds is not None
        notes.append(started.model_note)
        assert handle.worker.resident is not None
        pids.add(handle.worker.resident.pid)
    assert notes[0] is None
    assert notes[1] is not None and notes[1].startswith("dtype of ")
    assert notes[1].endswith(" is float16, loaded float32")
    assert notes[2] is not None and notes[2].startswith("config.json differs in ") and "hidden_size" in notes[2]
    assert notes[3] == f"missing tensor {gone}"
    assert len(pids) == 1, "each checkpoint of the model ran in the one resident process"


def _rewrite_weights_in_place(folder: Path, source: Path) -> None:
    """`folder`'s model.safetensors written again with `source`'s bytes, in the same file (the
    same inode), every other file of the folder kept."""
    data = (source / "model.safetensors").read_bytes()
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.write(data)
        handle.truncate()


async def test_a_checkpoint_folder_written_again_in_place_is_not_the_model_it_held(
    client: AsyncClient, worker_factory: Any, tmp_path: Path, nc: Any, topology: Topology
) -> None:
    folder = build_tiny_model(tmp_path / "latest", seed=0)
    seed_0 = build_tiny_model(tmp_path / "seed-0", seed=0)
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    handle = await worker_factory()

    async def job(**extra: Any) -> Any:
        info = await client.submit_and_wait(**_tiny_job(folder, limit=8, **extra), timeout=300)
        assert info.status == "completed", info.error
        return info, await _started(client, info.job_id), await client.results(info.job_id, tmp_path / info.job_id)

    a, a_started, a_files = await job()
    assert a_started.model_reused is False
    pid = handle.worker.resident.pid if handle.worker.resident else None

    # The folder removed and saved again with other weights (a trainer saving to `latest/`).
    shutil.rmtree(folder)
    build_tiny_model(folder, seed=1)
    b, b_started, b_files = await job()
    assert b_started.model_reused is False
    assert b_started.weights_swapped is True and b_started.model_note is None
    assert handle.worker.resident is not None and handle.worker.resident.pid == pid
    # The unchanged folder, next: the model now held is its own.
    c, c_started, c_files = await job()
    assert c_started.model_reused is True
    fresh, _, fresh_files = await job(fresh_model=True)
    assert b.result is not None and c.result is not None and fresh.result is not None and a.result is not None
    assert b.result.metrics == c.result.metrics == fresh.result.metrics
    assert _samples(b_files) == _samples(c_files) == _samples(fresh_files)
    assert _samples(a_files) != _samples(b_files), "the two checkpoints answer alike: the test tells nothing"

    # Only the weights file written again, in place: the first checkpoint's weights are back.
    _rewrite_weights_in_place(folder, seed_0)
    d, d_started, d_files = await job()
    assert d_started.model_reused is False
    assert d_started.weights_swapped is True and d_started.model_note is None
    e, e_started, e_files = await job()
    assert e_started.model_reused is True
    fresh_d, _, fresh_d_files = await job(fresh_model=True)
    assert d.result is not None and e.result is not None and fresh_d.result is not None
    assert d.result.metrics == e.result.metrics == fresh_d.result.metrics == a.result.metrics
    assert _samples(d_files) == _samples(e_files) == _samples(fresh_d_files) == _samples(a_files)


class _Wrapper:
    def __init__(self, module: Any, location: str) -> None:
        self.model = module
        self.pretrained = location


def _linear_checkpoint(folder: Path, seed: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    tensors = {k: v.detach().clone() for k, v in torch.nn.Linear(4, 3).state_dict().items()}
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"hidden": 4}')
    save_file(tensors, folder / "model.safetensors")
    return tensors


def _loaded_linear(folder: Path) -> tuple[Any, SwapState]:
    import torch

    module = torch.nn.Linear(4, 3).eval()
    with torch.no_grad():
        module.load_state_dict(_linear_checkpoint(folder, 0))
    return module, SwapState(_Wrapper(module, str(folder)), str(folder))


def test_the_loaded_checkpoints_own_folder_written_again_takes_the_swap_compared_with_what_was_loaded(
    tmp_path: Path,
) -> None:
    import torch

    module, state = _loaded_linear(tmp_path / "latest")
    state.verify()
    assert state.refusal is None
    new = _linear_checkpoint(tmp_path / "latest", 1)
    assert state.swap(str(tmp_path / "latest")) is None
    assert all(torch.equal(module.state_dict()[k], v) for k, v in new.items())
    # Its config written again with another content: compared with the loaded one's record.
    (tmp_path / "latest" / "config.json").write_text('{"hidden": 5}')
    assert state.swap(str(tmp_path / "latest")) == "config.json differs in hidden"


def test_weights_written_again_in_place_before_the_check_refuse_swaps_with_the_reason(tmp_path: Path) -> None:
    _module, state = _loaded_linear(tmp_path / "latest")
    _linear_checkpoint(tmp_path / "other", 1)
    time.sleep(0.01)  # a later modification time, whatever the file system's resolution
    _rewrite_weights_in_place(tmp_path / "latest", tmp_path / "other")
    state.verify()
    reason = "model.safetensors of its checkpoint was written again before it was compared"
    assert state.refusal == f"the loaded model takes no weights: {reason}"
