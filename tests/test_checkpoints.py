"""`evalq watch-dir`: one evaluation per complete checkpoint, none for an incomplete one,
none twice across restarts; a checkpoint deleted before its job runs fails it clearly."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient, JobFailed
from evalq.checkpoints import INDEX, DirWatcher
from evalq.config import Settings
from evalq.policy import PoolPolicy, store_policy
from evalq.topology import Topology

from .conftest import EVALQ, run_command, settings_env
from .jobs import FAKE


def checkpoint(root: Path, name: str, shards: int = 2, written: int | None = None) -> Path:
    """A Hugging Face-shaped checkpoint: an index naming `shards` files, `written` of them present."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if shards == 1:
        (folder / "model.safetensors").write_bytes(b"w" * 64)
        return folder
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    (folder / INDEX).write_text(json.dumps({"weight_map": {f"layer.{i}": f for i, f in enumerate(files)}}))
    for name_ in files[: shards if written is None else written]:
        (folder / name_).write_bytes(b"w" * 64)
    return folder


@pytest.fixture
async def allowed(nc: Any, topology: Topology, tmp_path: Path) -> Path:
    """The pool lets requests name models under tmp_path."""
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    return tmp_path / "out"


async def watch_dir(settings: Settings, folder: Path, *args: str) -> list[dict[str, Any]]:
    argv = [*EVALQ, "watch-dir", str(folder), "--tasks", "evalq_demo", "--model", "dummy", "--limit", "2"]
    argv += ["--label", "run=r1", "--once", "--interval", "0.2", "--json", *args]
    code, out, err = await run_command(argv, settings_env(settings), timeout=60)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_watch_dir_submits_each_complete_checkpoint_once(
    settings: Settings, client: AsyncClient, allowed: Path
) -> None:
    ten = checkpoint(allowed, "checkpoint-10")
    twenty = checkpoint(allowed, "checkpoint-20", written=1)  # a shard still missing
    thirty = checkpoint(allowed, "checkpoint-30", shards=1)
    checkpoint(allowed, "logs-40")  # not a checkpoint's name

    first = await watch_dir(settings, allowed)
    assert [(c["path"], c["step"], c["duplicate"]) for c in first] == [(str(ten), 10, False), (str(thirty), 30, False)]
    info = await client.get_job(first[0]["job_id"])
    assert info.labels == {"run": "r1", "step": "10", "checkpoint": "checkpoint-10"}
    assert info.request is not None and info.request.model_args == {"pretrained": str(ten)}

    shutil.copy(ten / "model-00002-of-00002.safetensors", twenty / "model-00002-of-00002.safetensors")
    second = await watch_dir(settings, allowed)
    assert [(c["path"], c["step"]) for c in second] == [(str(twenty), 20)]

    assert await watch_dir(settings, allowed) == []  # restarted: nothing new

    # Without its state file, the Idempotency-Keys still find the same jobs.
    shutil.rmtree(Path(settings.home) / "watch-dir")
    again = await watch_dir(settings, allowed)
    assert {c["job_id"] for c in again} == {c["job_id"] for c in first + second}
    assert all(c["duplicate"] for c in again)


async def test_watch_dir_waits_for_sizes_to_settle_and_for_a_marker(
    settings: Settings, client: AsyncClient, allowed: Path, tmp_path: Path
) -> None:
    folder = checkpoint(allowed, "checkpoint-5")
    watcher = DirWatcher(client, allowed, {"model": "dummy", "tasks": ["evalq_demo"]}, state_file=tmp_path / "s.json")
    assert await watcher.scan() == []  # seen once
    with open(folder / "model-00002-of-00002.safetensors", "ab") as shard:
        shard.write(b"more")  # still being written
    assert await watcher.scan() == []
    (submitted,) = await watcher.scan()
    assert submitted.step == 5

    marked = DirWatcher(
        client, allowed, {"model": "dummy", "tasks": ["evalq_demo"]}, marker="DONE", state_file=tmp_path / "m.json"
    )
    assert await marked.scan() == [] and await marked.scan() == []
    (folder / "DONE").touch()
    assert await marked.scan() == []
    (again,) = await marked.scan()
    assert again.path == str(folder) and again.job_id != submitted.job_id


async def test_a_checkpoint_deleted_before_its_job_runs_fails_it_clearly(
    settings: Settings, client: AsyncClient, allowed: Path, worker_factory: Any, tmp_path: Path
) -> None:
    folder = checkpoint(allowed, "checkpoint-7", shards=1)
    watcher = DirWatcher(client, allowed, {"model": "dummy", "tasks": ["evalq_demo"]}, state_file=tmp_path / "s.json")
    await watcher.scan()
    (submitted,) = await watcher.scan()
    shutil.rmtree(folder)  # rotated away by the trainer before any worker took the job
    await worker_factory(evaluator=FAKE)
    with pytest.raises(JobFailed) as failed:
        await asyncio.wait_for(client.wait_for_job(submitted.job_id), 60)
    assert f"the checkpoint path {folder} (model_args.pretrained) does not exist" in str(failed.value)


async def test_watch_dir_refuses_a_bad_regex_in_one_line(settings: Settings, allowed: Path) -> None:
    allowed.mkdir()
    argv = [*EVALQ, "watch-dir", str(allowed), "--tasks", "evalq_demo", "--step-regex", "(", "--once"]
    code, _, err = await run_command(argv, settings_env(settings), timeout=60)
    assert code == 2 and "is not a regular expression" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["watch-dir", "track"])
async def test_training_run_commands_have_help_with_an_example(settings: Settings, command: str) -> None:
    code, out, _ = await run_command([*EVALQ, command, "--help"], settings_env(settings), timeout=60)
    assert code == 0 and "Example" in out and "--json" in out
