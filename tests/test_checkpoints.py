"""`evalq watch-dir`: one evaluation per complete checkpoint, none for an incomplete one,
none twice across restarts; a checkpoint is submitted about a settle window after its last
file is closed (filesystem events), or within the interval and the window (polling), with its
save time; a checkpoint deleted before its job runs fails it clearly; a folder the queue
refuses or that cannot be read is skipped, once, and the others go on; a folder's name is
never read as model arguments."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from evalq import AsyncClient, JobFailed
from evalq.checkpoints import INDEX, DirWatcher
from evalq.config import Settings
from evalq.errors import ConfigError, Unavailable
from evalq.fs_events import FolderEvents, filesystem_type
from evalq.gateway import Gateway
from evalq.policy import PoolPolicy, store_policy
from evalq.schemas import JobInfo
from evalq.topology import Topology

from .conftest import EVALQ, run_command, settings_env
from .jobs import FAKE, JOB
from .waiting import eventually


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


def saved(folder: Path) -> str:
    """The `saved_at` label a folder's files give: the newest modification time, RFC 3339 UTC, in ms."""
    newest = max(path.stat().st_mtime_ns for path in folder.iterdir())
    moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=newest // 1000)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def created(info: JobInfo) -> float:
    return dt.datetime.fromisoformat(info.created_at).timestamp()


async def job_for(client: AsyncClient, name: str) -> JobInfo | None:
    """The job whose `checkpoint` label is `name`, if there is one."""
    found = [info for info in await all_jobs(client) if info.labels.get("checkpoint") == name]
    assert len(found) <= 1, f"{name} was submitted {len(found)} times"
    return found[0] if found else None


def started(proc: Any, line: str) -> bool:
    """The watcher has said how it watches (`line`), and is still running."""
    assert proc.poll() is None, proc.log_path.read_text()
    return line in proc.log_path.read_text()


def stop(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0, proc.log_path.read_text()


@pytest.fixture
async def allowed(nc: Any, topology: Topology, tmp_path: Path) -> Path:
    """The pool lets requests name models under tmp_path."""
    await store_policy(nc, topology, "default", PoolPolicy(model_roots=[str(tmp_path)]), timeout=10)
    return tmp_path / "out"


def watch_argv(folder: Path, *args: str) -> list[str]:
    argv = [*EVALQ, "watch-dir", str(folder), "--tasks", "evalq_demo", "--model", "dummy", "--limit", "2"]
    return [*argv, "--label", "run=r1", "--interval", "0.2", "--settle", "0.2", *args]


async def watch_once(settings: Settings, folder: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    """`evalq watch-dir --once --json`: its exit code, the JSON lines it printed, its stderr."""
    code, out, err = await run_command(watch_argv(folder, "--once", "--json", *args), settings_env(settings), 60)
    return code, [json.loads(line) for line in out.splitlines()], err


async def watch_dir(settings: Settings, folder: Path, *args: str) -> list[dict[str, Any]]:
    code, printed, err = await watch_once(settings, folder, *args)
    assert code == 0, err
    return printed


async def all_jobs(client: AsyncClient) -> list[JobInfo]:
    """Every job in the queue, read from its jobs bucket."""
    bucket = await client.nc.jetstream().key_value(client.topology.jobs_bucket)
    try:
        keys = await bucket.keys()
    except NoKeysError:
        return []
    return [await client.get_job(key) for key in keys]


async def jobs_for(client: AsyncClient) -> set[str]:
    """The `checkpoint` labels of the queue's jobs."""
    return {info.labels.get("checkpoint", "") for info in await all_jobs(client)}


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
    assert info.labels == {"run": "r1", "step": "10", "checkpoint": "checkpoint-10", "saved_at": saved(ten)}
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
    # No window: each pass is a look, and a stamp is settled when two looks agree.
    request = {"model": "dummy", "tasks": ["evalq_demo"]}
    watcher = DirWatcher(client, allowed, request, state_file=tmp_path / "s.json", settle=0)
    assert (await watcher.scan()).submitted == []  # seen once
    with open(folder / "model-00002-of-00002.safetensors", "ab") as shard:
        shard.write(b"more")  # still being written
    assert (await watcher.scan()).submitted == []
    (submitted,) = (await watcher.scan()).submitted
    assert submitted.step == 5

    marked = DirWatcher(client, allowed, request, marker="DONE", state_file=tmp_path / "m.json", settle=0)
    assert (await marked.scan()).submitted == [] and (await marked.scan()).submitted == []
    (folder / "DONE").touch()
    assert (await marked.scan()).submitted == []
    (again,) = (await marked.scan()).submitted
    assert again.path == str(folder) and again.job_id != submitted.job_id


async def test_with_events_a_checkpoint_is_submitted_a_settle_window_after_its_last_file(
    settings: Settings, client: AsyncClient, allowed: Path, processes: Any
) -> None:
    allowed.mkdir()
    # A rescan a minute away: only the events can find the checkpoint in time.
    argv = watch_argv(allowed, "--interval", "60", "--settle", "1")
    proc = processes.start(argv, settings_env(settings), "watch-dir")
    await eventually(lambda: started(proc, "through filesystem events"), timeout=30, what="the watcher started")

    folder = checkpoint(allowed, "checkpoint-10", shards=3)
    closed = time.time()  # the last shard has just been closed
    info = await eventually(lambda: job_for(client, "checkpoint-10"), timeout=20, what="checkpoint-10 submitted")
    latency = created(info) - closed
    print(f"\nwith events, --settle 1: submitted {latency:.3f} s after the last file was closed")
    assert 0.95 <= latency < 2.0, latency  # the window, and no more than a second past it
    assert info.labels["saved_at"] == saved(folder) and info.labels["step"] == "10"
    stop(proc)


async def test_polling_submits_a_checkpoint_within_the_interval_and_the_settle_window(
    settings: Settings, client: AsyncClient, allowed: Path, processes: Any
) -> None:
    allowed.mkdir()
    proc = processes.start(watch_argv(allowed, "--poll", "--interval", "1", "--settle", "1"), settings_env(settings))
    await eventually(lambda: started(proc, "by scanning every 1 s (--poll)"), timeout=30, what="the watcher started")

    folder = checkpoint(allowed, "checkpoint-20", shards=2)
    closed = time.time()
    info = await eventually(lambda: job_for(client, "checkpoint-20"), timeout=20, what="checkpoint-20 submitted")
    latency = created(info) - closed
    print(f"\npolling, --interval 1 --settle 1: submitted {latency:.3f} s after the last file was closed")
    assert latency < 1 + 1 + 1.0, latency  # the interval, the window, and a margin
    assert info.labels["saved_at"] == saved(folder)
    stop(proc)


async def test_nothing_is_submitted_twice_across_a_restart_of_the_watcher(
    settings: Settings, client: AsyncClient, allowed: Path, processes: Any
) -> None:
    allowed.mkdir()
    argv = watch_argv(allowed, "--interval", "60", "--json")
    proc = processes.start(argv, settings_env(settings), "watch-dir")
    await eventually(lambda: started(proc, "through filesystem events"), timeout=30, what="the watcher started")
    checkpoint(allowed, "checkpoint-1", shards=1)
    first = await eventually(lambda: job_for(client, "checkpoint-1"), timeout=20, what="checkpoint-1 submitted")
    stop(proc)

    checkpoint(allowed, "checkpoint-2", shards=1)  # saved while no watcher runs
    again = processes.start(argv, settings_env(settings), "watch-dir")
    second = await eventually(lambda: job_for(client, "checkpoint-2"), timeout=20, what="checkpoint-2 submitted")
    checkpoint(allowed, "checkpoint-3", shards=1)
    await eventually(lambda: job_for(client, "checkpoint-3"), timeout=20, what="checkpoint-3 submitted")
    stop(again)

    assert len(await all_jobs(client)) == 3 and first.job_id != second.job_id
    # Each process printed only what it submitted itself: checkpoint-1 is not in the second's output.
    printed = [json.loads(line) for line in again.log_path.read_text().splitlines() if line.startswith("{")]
    assert [Path(c["path"]).name for c in printed] == ["checkpoint-2", "checkpoint-3"]
    assert not any(c["duplicate"] for c in printed)


def unreadable(folder: Path) -> list[str]:
    """Make `folder` unreadable to the watcher; the command prefix that runs the watcher so.

    As root, permissions do not bind; in a user namespace that maps only root, a folder owned
    by an unmapped user is out of reach of root's overrides, so the mode binds there.
    """
    folder.chmod(0o000)
    if os.geteuid() != 0:
        return []
    os.chown(folder, 54321, 54321)
    prefix = ["unshare", "--user", "--map-root-user"]
    try:
        probe = subprocess.run([*prefix, "ls", str(folder)], capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pytest.skip("running as root, and no user namespace to make a folder unreadable in")
    if probe.returncode == 0 or b"Permission denied" not in probe.stderr:
        pytest.skip(f"running as root, and a user namespace does not deny the folder: {probe.stderr!r}")
    return prefix


async def test_an_unreadable_folder_is_skipped_and_the_later_ones_submitted(
    settings: Settings, client: AsyncClient, allowed: Path, processes: Any
) -> None:
    locked = checkpoint(allowed, "checkpoint-100", shards=1)
    prefix = unreadable(locked)
    try:
        checkpoint(allowed, "checkpoint-200", shards=1)
        proc = processes.start([*prefix, *watch_argv(allowed, "--interval", "0.5")], settings_env(settings))

        async def submitted(name: str) -> bool:
            assert proc.poll() is None, proc.log_path.read_text()
            return name in await jobs_for(client)

        await eventually(lambda: submitted("checkpoint-200"), timeout=30, what="checkpoint-200 submitted")
        checkpoint(allowed, "checkpoint-300", shards=1)  # written after the failure to read
        await eventually(lambda: submitted("checkpoint-300"), timeout=30, what="checkpoint-300 submitted")
        log = proc.log_path.read_text()
        # Said once, for all the rescans so far.
        assert log.count("cannot read the checkpoint") == 1 and "checkpoint-100" in log, log
        assert "Permission denied" in log and "Traceback" not in log, log
        stop(proc)
        assert await jobs_for(client) == {"checkpoint-200", "checkpoint-300"}
    finally:
        locked.chmod(0o755)


async def test_saved_at_is_the_newest_file_time_and_no_part_of_the_key(
    settings: Settings, client: AsyncClient, allowed: Path, tmp_path: Path
) -> None:
    folder = checkpoint(allowed, "checkpoint-9")
    newest = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z
    for path, at in [(folder / INDEX, newest - 10**9), (folder / "model-00001-of-00002.safetensors", newest)]:
        os.utime(path, ns=(at, at))
    os.utime(folder / "model-00002-of-00002.safetensors", ns=(newest - 5, newest - 5))
    watcher = DirWatcher(client, allowed, {**JOB, "labels": {"saved_at": "set by hand"}}, state_file=tmp_path / "s")
    await watcher.scan()
    (submitted,) = (await eventually(watcher.scan, timeout=10, until=lambda scan: scan.submitted)).submitted
    info = await client.get_job(submitted.job_id)
    assert info.labels["saved_at"] == "2023-11-14T22:13:20.123Z"

    # Another watcher (no state file) finds the same job: the label is not in the key.
    other = DirWatcher(client, allowed, JOB, state_file=tmp_path / "other", settle=0)
    await other.scan()
    (again,) = (await other.scan()).submitted
    assert again.job_id == submitted.job_id and again.duplicate


async def test_a_checkpoint_is_submitted_only_after_its_settle_window(
    settings: Settings, client: AsyncClient, allowed: Path, tmp_path: Path
) -> None:
    checkpoint(allowed, "checkpoint-6", shards=1)
    watcher = DirWatcher(client, allowed, JOB, state_file=tmp_path / "s.json", settle=0.5)
    assert (await watcher.scan()).submitted == []
    seen = time.monotonic()
    assert (await watcher.scan()).submitted == []  # the same stamp, within the window
    await eventually(watcher.scan, timeout=10, until=lambda scan: scan.submitted)
    assert time.monotonic() - seen >= 0.5


async def test_where_events_cannot_be_had_the_watcher_polls_and_says_why(
    settings: Settings, client: AsyncClient, allowed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def limit_reached(self: FolderEvents) -> None:
        raise ConfigError("filesystem events are unavailable: the kernel's limit on watches was reached")

    monkeypatch.setattr(FolderEvents, "start", limit_reached)
    checkpoint(allowed, "checkpoint-11", shards=1)
    lines: list[str] = []
    stop = asyncio.Event()
    watcher = DirWatcher(client, allowed, JOB, state_file=tmp_path / "s.json", settle=0.2)
    running = asyncio.create_task(watcher.run(0.5, stop, lambda _: stop.set(), on_start=lines.append))
    summary = await asyncio.wait_for(running, 30)
    assert [c.step for c in summary.submitted] == [11]
    assert lines == [
        f"watching {allowed} by scanning every 0.5 s (filesystem events are unavailable: the kernel's limit on "
        "watches was reached); a checkpoint is submitted 0.2 s after its files stop changing"
    ]
    # Asked for by name, events that cannot be had are the command's error, not a quiet fallback.
    asked = DirWatcher(client, allowed, JOB, state_file=tmp_path / "t.json", events=True)
    with pytest.raises(ConfigError, match="--events: filesystem events are unavailable"):
        await asyncio.wait_for(asked.run(0.5, asyncio.Event()), 30)


def test_the_filesystem_type_is_read_from_the_mount_table() -> None:
    table = "\n".join(
        [
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw",
            "40 22 0:40 / /data rw,relatime shared:2 - nfs4 server:/export rw,vers=4.2",
            "41 40 0:41 / /data/local\\040disk rw shared:3 - xfs /dev/sdb1 rw",
        ]
    )
    assert filesystem_type("/data/runs/exp1", table) == "nfs4"
    assert filesystem_type("/data/local disk/exp1", table) == "xfs"
    assert filesystem_type("/database", table) == "ext4"
    assert filesystem_type("/anything", "") is None


async def test_the_trainer_callback_labels_each_job_with_its_save_time(
    settings: Settings, client: AsyncClient, allowed: Path, nc: Any, topology: Topology
) -> None:
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from evalq.integrations import EvalqCallback

    callback = EvalqCallback(tasks=["evalq_demo"], model="dummy", settings=settings, run="r1", submit_retry_s=5.0)
    args = SimpleNamespace(output_dir=str(allowed), run_name="r1")
    state = SimpleNamespace(global_step=4, is_world_process_zero=True)
    before = time.time()
    await asyncio.to_thread(callback.on_save, args, state, None)
    after = time.time()
    await asyncio.to_thread(callback.on_train_end, args, state, None)

    (item,) = callback.submitted
    assert item.accepted is not None, item.error
    info = await client.get_job(item.accepted.job_id)
    at = dt.datetime.fromisoformat(info.labels["saved_at"]).timestamp()
    assert info.labels["saved_at"].endswith("Z") and before - 0.001 <= at <= after
    assert {k: v for k, v in info.labels.items() if k != "saved_at"} == {"step": "4", "run": "r1"}


async def test_a_checkpoint_deleted_before_its_job_runs_fails_it_clearly(
    settings: Settings, client: AsyncClient, allowed: Path, worker_factory: Any, tmp_path: Path
) -> None:
    folder = checkpoint(allowed, "checkpoint-7", shards=1)
    request = {"model": "dummy", "tasks": ["evalq_demo"]}
    watcher = DirWatcher(client, allowed, request, state_file=tmp_path / "s.json", settle=0)
    await watcher.scan()
    (submitted,) = (await watcher.scan()).submitted
    shutil.rmtree(folder)  # rotated away by the trainer before any worker took the job
    await worker_factory(evaluator=FAKE)
    with pytest.raises(JobFailed) as failed:
        await asyncio.wait_for(client.wait_for_job(submitted.job_id), 60)
    assert f"the checkpoint path {folder} (model_args.pretrained) does not exist" in str(failed.value)


async def test_a_refused_checkpoint_is_skipped_once_and_the_later_ones_submitted(
    settings: Settings, client: AsyncClient, allowed: Path
) -> None:
    first = checkpoint(allowed, "checkpoint-100", shards=1)
    bad = checkpoint(allowed, "checkpoint-200\nforged line", shards=1)  # no model path holds a newline
    third = checkpoint(allowed, "checkpoint-300", shards=1)

    code, printed, err = await watch_once(settings, allowed)
    assert code == 0, err
    assert [(c["path"], c["step"]) for c in printed] == [(str(first), 100), (str(third), 300)]
    # One line for it, its name escaped: the newline forges no line of its own.
    assert err.count("refused the checkpoint") == 1, err
    assert "checkpoint-200\\x0aforged line" in err and "\nforged line" not in err
    (state_file,) = (Path(settings.home) / "watch-dir").glob("*.json")
    refused = json.loads(state_file.read_text())["refused"]
    assert list(refused) == [str(bad)] and refused[str(bad)]["refused"].startswith("422:")

    # Restarted: the refused folder is not tried again, the others are not submitted twice.
    code, printed, err = await watch_once(settings, allowed)
    assert (code, printed) == (0, []) and "refused" not in err, err
    assert await jobs_for(client) == {"checkpoint-100", "checkpoint-300"}


async def test_the_watcher_goes_on_after_a_refused_checkpoint(
    settings: Settings, client: AsyncClient, allowed: Path, processes: Any
) -> None:
    checkpoint(allowed, "checkpoint-200\nforged line", shards=1)
    checkpoint(allowed, "checkpoint-300", shards=1)
    proc = processes.start(watch_argv(allowed), settings_env(settings), "watch-dir")

    async def submitted(name: str) -> bool:
        assert proc.poll() is None, proc.log_path.read_text()
        return name in await jobs_for(client)

    await eventually(lambda: submitted("checkpoint-300"), timeout=45, what="checkpoint-300 submitted")
    checkpoint(allowed, "checkpoint-400", shards=1)  # written after the refusal
    await eventually(lambda: submitted("checkpoint-400"), timeout=45, what="checkpoint-400 submitted")
    # Refused once in all the scans so far, not once a scan.
    assert proc.log_path.read_text().count("refused the checkpoint") == 1

    os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while proc.poll() is None:
        assert time.monotonic() < deadline, "evalq watch-dir did not stop on SIGTERM"
        await asyncio.sleep(0.1)
    assert proc.returncode == 0, proc.log_path.read_text()
    assert await jobs_for(client) == {"checkpoint-300", "checkpoint-400"}


async def test_a_queue_that_is_away_leaves_the_checkpoint_to_the_next_scan(
    settings: Settings, nc: Any, topology: Topology, allowed: Path, tmp_path: Path
) -> None:
    folder = checkpoint(allowed, "checkpoint-8", shards=1)
    # No gateway yet; a short request timeout, since each submission waits that long for one.
    async with AsyncClient(settings.with_(request_timeout=1.0)) as client:
        watcher = DirWatcher(client, allowed, JOB, state_file=tmp_path / "s.json", settle=0)
        await watcher.scan()  # seen once
        away = await watcher.scan()
        assert [f.path for f in away.failed] == [str(folder)] and isinstance(away.failed[0].error, Unavailable)
        assert away.refused == [] and not (tmp_path / "s.json").exists()
        # --once: a folder left unsubmitted by a queue that is away fails the run.
        once = DirWatcher(client, allowed, JOB, state_file=tmp_path / "once.json", settle=0)
        with pytest.raises(Unavailable):
            await once.run(0.01, asyncio.Event(), passes=2)

        async with Gateway(nc, settings, topology):
            (submitted,) = (await watcher.scan()).submitted
    assert submitted.path == str(folder) and submitted.step == 8


async def test_a_folder_name_is_never_read_as_model_arguments(
    settings: Settings, client: AsyncClient, allowed: Path
) -> None:
    checkpoint(allowed, "checkpoint-400,trust_remote_code=True", shards=1)
    fine = checkpoint(allowed, "checkpoint-500", shards=1)

    code, printed, err = await watch_once(settings, allowed, "--model-args", "dtype=float32")
    jobs = await all_jobs(client)
    args = [info.request.model_args for info in jobs if info.request is not None]
    assert [a for a in args if "trust_remote_code" in str(a)] == []
    assert args == [{"pretrained": str(fine), "dtype": "float32"}]
    assert code == 0, err
    assert [c["path"] for c in printed] == [str(fine)]
    assert "refused the checkpoint" in err and "checkpoint-400,trust_remote_code=True" in err

    with pytest.raises(ConfigError, match="expected k=v,k=v"):
        DirWatcher(client, allowed, {**JOB, "model_args": "dtype=a=b"})


async def test_watch_dir_refuses_a_bad_regex_in_one_line(settings: Settings, allowed: Path) -> None:
    allowed.mkdir()
    argv = [*EVALQ, "watch-dir", str(allowed), "--tasks", "evalq_demo", "--step-regex", "(", "--once"]
    code, _, err = await run_command(argv, settings_env(settings), timeout=60)
    assert code == 2 and "is not a regular expression" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["watch-dir", "track"])
async def test_training_run_commands_have_help_with_an_example(settings: Settings, command: str) -> None:
    code, out, _ = await run_command([*EVALQ, command, "--help"], settings_env(settings), timeout=60)
    assert code == 0 and "Example" in out and "--json" in out
    if command == "watch-dir":
        assert "--settle" in out and "--events" in out and "--poll" in out
