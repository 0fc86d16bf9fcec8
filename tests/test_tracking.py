"""`evalq track`: completed jobs' metrics in TensorBoard, MLflow and W&B (offline), read back
with each library's own reader, at the step of their label, once each across restarts; a job
a tracker can never log is skipped, once, and the jobs after it are logged."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.schemas import Completed, Tracked, decode_event, encode, now
from evalq.topology import Topology

from .conftest import EVALQ, run_command, settings_env
from .events import all_events, kinds
from .jobs import FAKE
from .waiting import eventually

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

TAG = "eval/evalq_demo/exact_match"


@pytest.fixture(autouse=True)
def folder_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow 3 refuses a folder store unless told that it is wanted (a test has no database).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def track_env(settings: Settings) -> dict[str, str]:
    return settings_env(settings, WANDB_SILENT="true", WANDB_MODE="offline")


async def complete(client: AsyncClient, step: int | None, score: float, run: str = "r1") -> str:
    labels = {"run": run, "team": "vision"}
    if step is not None:
        labels["step"] = str(step)
    info = await client.submit_and_wait(
        model="dummy", tasks=["evalq_demo"], limit=2, model_args={"score": score}, labels=labels, timeout=60
    )
    return info.job_id


async def track(settings: Settings, root: Path, *args: str, timeout: float = 120) -> list[dict[str, Any]]:
    code, outcomes, err = await track_run(settings, root, *args, timeout=timeout)
    assert code == 0, err
    return outcomes


async def track_run(
    settings: Settings, root: Path, *args: str, timeout: float = 120
) -> tuple[int, list[dict[str, Any]], str]:
    """`evalq track --json` with the three trackers: its exit code, its JSON lines, its stderr."""
    argv = [
        *EVALQ,
        "track",
        "--tensorboard",
        str(root / "tb"),
        "--mlflow",
        (root / "mlruns").as_uri(),
        "--wandb",
        str(root / "wb"),
        "--json",
        *args,
    ]
    code, out, err = await run_command(argv, track_env(settings), timeout=timeout)
    return code, [json.loads(line) for line in out.splitlines()], err


def tensorboard_points(root: Path, run: str = "r1", tag: str = TAG) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "tb" / run))
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def mlflow_run(root: Path, run: str = "r1", tag: str = TAG) -> tuple[Any, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("evalq")
    (found,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`evalq.run` = '{run}'")
    points = [(m.step, round(m.value, 6)) for m in client.get_metric_history(found.info.run_id, tag)]
    return found, sorted(points)


def wandb_points(root: Path, tag: str = TAG) -> list[tuple[int, float]]:
    from evalq.tracking import wandb_records

    return sorted(
        (row["train/global_step"], round(row[tag], 6))
        for _, rows in wandb_records(root / "wb")
        for row in rows
        if tag in row
    )


async def test_track_logs_to_each_tracker_at_the_labelled_step(
    settings: Settings, client: AsyncClient, worker_factory: Any, tmp_path: Path
) -> None:
    await worker_factory(evaluator=FAKE)
    first = await complete(client, 20, 0.5)
    second = await complete(client, 10, 0.25)  # evaluations may finish out of step order
    unplaced = await complete(client, None, 0.75)

    outcomes = await track(settings, tmp_path, "--max-jobs", "3")

    assert [o["job_id"] for o in outcomes] == [first, second, unplaced]
    assert outcomes[0]["trackers"] == {"tensorboard": "logged", "mlflow": "logged", "wandb": "logged"}
    assert outcomes[2]["step"] is None and outcomes[2]["trackers"] == {}

    assert sorted(tensorboard_points(tmp_path)) == [(10, 0.25), (20, 0.5)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "r1"))
    acc.Reload()
    tags = [json.loads(t.tensor_proto.string_val[0]) for t in acc.Tensors("evalq/job")]
    assert {(t["job_id"], t["step"], t["team"]) for t in tags} == {(first, "20", "vision"), (second, "10", "vision")}

    run, points = mlflow_run(tmp_path)
    assert points == [(10, 0.25), (20, 0.5)]
    assert run.data.tags["label.team"] == "vision"
    assert json.loads(run.data.tags[f"evalq.job.{first}"]) == {
        "step": 20,
        "labels": {"run": "r1", "step": "20", "team": "vision"},
    }

    assert wandb_points(tmp_path) == [(10, 0.25), (20, 0.5)]
    from evalq.tracking import wandb_records

    jobs = {config["evalq_job_id"] for config, rows in wandb_records(tmp_path / "wb") if rows}
    assert jobs == {first, second}

    # Each logged job has its `tracked` event, after its `completed` one; the unplaced one has none.
    for job_id in (first, second):
        events = await all_events(client, job_id)
        assert kinds(events)[-2:] == ["completed", "tracked"]
        assert isinstance(events[-1], Tracked) and events[-1].trackers == ["tensorboard", "mlflow", "wandb"]
        assert events[-1].labels["step"] == events[-2].labels["step"] and events[-1].time >= events[-2].time
    assert "tracked" not in kinds(await all_events(client, unplaced))


async def test_track_restart_and_a_crash_before_the_ack_leave_no_gap_and_no_duplicate(
    settings: Settings, client: AsyncClient, worker_factory: Any, topology: Topology, tmp_path: Path, nc: Any
) -> None:
    from evalq.tracking import MlflowTracker, TensorBoardTracker, WandbTracker, job_metrics

    await worker_factory(evaluator=FAKE)
    jobs = [await complete(client, step, step / 100) for step in (10, 20, 30)]

    first = await track(settings, tmp_path, "--max-jobs", "2")
    assert [o["job_id"] for o in first] == jobs[:2]

    # The third job is logged by every tracker, then the process dies before its ack.
    stored = await nc.jetstream().get_last_msg(
        topology.events_stream, topology.event_subject(jobs[2], "completed", team="default")
    )
    event = decode_event(stored.data)
    assert isinstance(event, Completed)
    job = job_metrics(event)
    assert job is not None
    for tracker in (
        TensorBoardTracker(tmp_path / "tb"),
        MlflowTracker((tmp_path / "mlruns").as_uri()),
        WandbTracker(tmp_path / "wb"),
    ):
        assert tracker.log(job)
    # W&B: the crash came after its run file was written, before the job's record was.
    done = tmp_path / "wb" / "evalq-jobs" / f"{jobs[2]}.done"
    done.replace(done.with_suffix(".intent"))

    # Jobs complete while the tracker is down.
    jobs += [await complete(client, step, step / 100) for step in (40, 50)]

    second = await track(settings, tmp_path, "--max-jobs", "3")
    assert [o["job_id"] for o in second] == jobs[2:]
    assert second[0]["trackers"] == {"tensorboard": "present", "mlflow": "present", "wandb": "present"}
    assert all(set(o["trackers"].values()) == {"logged"} for o in second[1:])

    expected = [(step, step / 100) for step in (10, 20, 30, 40, 50)]
    assert sorted(tensorboard_points(tmp_path)) == expected
    assert mlflow_run(tmp_path)[1] == expected
    assert wandb_points(tmp_path) == expected


async def test_a_job_no_tracker_can_log_is_skipped_once_and_the_next_one_logged(
    settings: Settings, client: AsyncClient, worker_factory: Any, topology: Topology, tmp_path: Path, nc: Any
) -> None:
    await worker_factory(evaluator=FAKE)
    poisoned = await complete(client, 10**23, 0.9)  # any submitter may label a job so
    good = await complete(client, 10, 0.25)

    # Bounded: a tracker that retried the first job for ever would never reach the second.
    code, outcomes, err = await track_run(settings, tmp_path, "--max-jobs", "2", timeout=90)
    assert code == 0, err
    assert [o["job_id"] for o in outcomes] == [poisoned, good]
    assert outcomes[0]["trackers"] == {} and outcomes[0]["step"] is None
    assert "'100000000000000000000000' is not a whole number from 0 to 9223372036854775807" in outcomes[0]["skipped"]
    assert f"job {poisoned} skipped, it can never be logged" in err
    assert outcomes[1]["trackers"] == {"tensorboard": "logged", "mlflow": "logged", "wandb": "logged"}
    assert outcomes[1]["skipped"] is None
    assert tensorboard_points(tmp_path) == [(10, 0.25)]
    assert mlflow_run(tmp_path)[1] == [(10, 0.25)]
    assert wandb_points(tmp_path) == [(10, 0.25)]

    # Restarted: the skipped job was acknowledged, so it is not tried again.
    later = await complete(client, 20, 0.5)
    again = await track(settings, tmp_path, "--max-jobs", "1", timeout=90)
    assert [o["job_id"] for o in again] == [later]
    consumer = await nc.jetstream().consumer_info(topology.events_stream, f"{topology.prefix}-track-tracker")
    assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)
    assert tensorboard_points(tmp_path) == [(10, 0.25), (20, 0.5)]


async def test_a_metric_name_mlflow_refuses_is_skipped_there_and_logged_elsewhere(
    settings: Settings, topology: Topology, tmp_path: Path, nc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evalq.tracking import MlflowTracker, TensorBoardTracker, Tracking, TrackOptions, WandbTracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    # lmms-eval names a metric of a filter other than `none` `metric,filter` (gsm8k's
    # `exact_match,strict-match`); MLflow allows no comma in a metric's name.
    filtered, plain = "eval/gsm8k/exact_match,strict-match", "eval/gsm8k/exact_match"
    jobs = []
    for name, step in ((filtered, 10), (plain, 20)):
        job_id = str(uuid.uuid4())
        metrics = {"gsm8k": {name.rsplit("/", 1)[1]: step / 100}}
        event = Completed(job_id=job_id, time=now(), labels={"run": "r1", "step": str(step)}, metrics=metrics)
        await nc.jetstream().publish(topology.event_subject(job_id, "completed", team="default"), encode(event))
        jobs.append(job_id)

    trackers = [
        TensorBoardTracker(tmp_path / "tb"),
        MlflowTracker((tmp_path / "mlruns").as_uri()),
        WandbTracker(tmp_path / "wb"),
    ]
    outcomes: list[Any] = []
    async with Tracking(settings, trackers, TrackOptions(max_jobs=2)) as tracking:
        await asyncio.wait_for(tracking.run(outcomes.append), 90)

    assert [o.job_id for o in outcomes] == jobs
    assert outcomes[0].trackers == {"tensorboard": "logged", "mlflow": "skipped", "wandb": "logged"}
    assert outcomes[0].skipped.startswith("mlflow: MLflow refuses it: Invalid value")
    assert set(outcomes[1].trackers.values()) == {"logged"} and outcomes[1].skipped is None
    assert tracking.skipped == 1
    assert tensorboard_points(tmp_path, tag=filtered) == [(10, 0.1)]
    assert wandb_points(tmp_path, tag=filtered) == [(10, 0.1)]
    assert mlflow_run(tmp_path, tag=plain)[1] == [(20, 0.2)]


@pytest.mark.parametrize(
    ("text", "step"),
    [("0", 0), ("0042", 42), (str(2**63 - 1), 2**63 - 1)]
    + [(text, None) for text in (str(2**63), "-1", "+5", " 5", "5_000", "1e3", "\u0663", "")],
)
def test_a_step_is_whole_and_within_every_trackers_range(text: str, step: int | None) -> None:
    from evalq.tracking import Unloggable, parse_step

    if step is not None:
        assert parse_step(text) == step
    else:
        with pytest.raises(Unloggable, match="is not a whole number from 0 to 9223372036854775807"):
            parse_step(text)


async def test_track_without_a_tracker_library_says_which_extra(settings: Settings, tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['mlflow'] = None; from evalq.cli import main; "
        f"sys.argv = ['evalq', 'track', '--mlflow', {str(tmp_path)!r}]; main()"
    )
    code, _, err = await run_command([sys.executable, "-c", script], settings_env(settings), timeout=60)
    assert code == 2
    assert "pip install 'evalq[mlflow]'" in err
    assert "Traceback" not in err


async def test_track_stops_on_sigterm(settings: Settings, topology: Topology, processes: Any, tmp_path: Path) -> None:
    import os
    import signal

    proc = processes.start([*EVALQ, "track", "--tensorboard", str(tmp_path / "tb")], track_env(settings), "track")

    def tracking() -> bool:
        log = proc.log_path.read_text()
        assert "tracking completed jobs" in log or proc.poll() is None, log
        return "tracking completed jobs" in log

    await eventually(tracking, timeout=60, what=lambda: f"evalq track to start: {proc.log_path.read_text()}")
    os.kill(proc.pid, signal.SIGTERM)
    await eventually(proc.poll, until=lambda code: code is not None, timeout=10, what="evalq track to stop on SIGTERM")
    assert proc.returncode == 0, proc.log_path.read_text()


async def test_track_without_a_queue_says_so_in_one_line(settings: Settings, tmp_path: Path) -> None:
    argv = [*EVALQ, "track", "--tensorboard", str(tmp_path / "tb")]
    code, _, err = await run_command(argv, track_env(settings), timeout=60)
    assert code == 1 and f"the events stream {settings.queue.prefix.upper()}_EVENTS does not exist" in err
    assert "Traceback" not in err


def tensorboard_holds(root: Path, job_id: str, tag: str = TAG, run: str = "r1") -> bool:
    """Whether the job's event file is in place with `tag` in it, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    folder = root / "tb" / run
    for path in folder.glob(f"*.evalq-{job_id}") if folder.exists() else []:
        if any(value.tag == tag for event in EventFileLoader(str(path)).Load() for value in event.summary.value):
            return True
    return False


async def test_a_completed_job_is_in_tensorboard_within_a_second(
    settings: Settings, topology: Topology, tmp_path: Path, nc: Any
) -> None:
    from evalq.events import EventPublisher
    from evalq.tracking import TensorBoardTracker, Tracking, TrackOptions

    publisher = EventPublisher(nc, topology, timeout=10.0)
    latencies = []
    async with Tracking(settings, [TensorBoardTracker(tmp_path / "tb")], TrackOptions()) as tracking:
        running = asyncio.create_task(tracking.run())
        for index in range(7):
            # Each event comes at another point of the tracker's one-second long poll.
            await asyncio.sleep(0.37 * index % 1.0)
            job_id = str(uuid.uuid4())
            metrics = {"evalq_demo": {"exact_match": index / 10}}
            labels = {"run": "r1", "step": str(index * 100)}
            event = Completed(job_id=job_id, time=now(), attempt=1, worker="w1", labels=labels, metrics=metrics)
            begun = time.monotonic()
            await publisher.publish(event)  # as the worker does: to the job's subject, with its message id
            await eventually(lambda job=job_id: tensorboard_holds(tmp_path, job), timeout=30, interval=0.002)
            latencies.append(round(time.monotonic() - begun, 3))
        tracking.stop()
        await asyncio.wait_for(running, 10)
    print(f"completed -> TensorBoard, seconds: {latencies}, median {statistics.median(latencies)}")
    assert statistics.median(latencies) < 1.0, latencies
    assert sorted(tensorboard_points(tmp_path)) == [(index * 100, round(index / 10, 6)) for index in range(7)]


async def test_the_tracked_event_is_published_once_across_a_redelivery(
    settings: Settings, topology: Topology, tmp_path: Path, nc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nats.js import api

    from evalq.tracking import TensorBoardTracker, Tracking, TrackOptions

    js = nc.jetstream()
    # The tracker's consumer, made beforehand with a short ack wait so the redelivery comes soon.
    durable = f"{topology.prefix}-track-tracker"
    await js.add_consumer(
        topology.events_stream,
        api.ConsumerConfig(
            durable_name=durable,
            filter_subject=topology.events_filter(kind="completed"),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=1.0,
            max_ack_pending=1,
        ),
    )
    job_id = str(uuid.uuid4())
    labels = {"run": "r1", "step": "10"}
    metrics = {"evalq_demo": {"exact_match": 0.5}}
    # A team's job: its tracked event goes under the same team as its completed one.
    event = Completed(job_id=job_id, time=now(), attempt=1, labels=labels, team="ml", metrics=metrics)
    await js.publish(topology.event_subject(job_id, "completed", team="ml"), encode(event))

    # The tracker logs the job and publishes its record, then dies before the ack.
    handle = Tracking._handle

    async def killed_before_the_ack(self: Tracking, data: bytes, msg: Any) -> Any:
        await handle(self, data, msg)
        raise RuntimeError("killed before the ack")

    monkeypatch.setattr(Tracking, "_handle", killed_before_the_ack)
    async with Tracking(settings, [TensorBoardTracker(tmp_path / "tb")], TrackOptions()) as tracking:
        with pytest.raises(RuntimeError, match="killed before the ack"):
            await asyncio.wait_for(tracking.run(), 30)
    monkeypatch.setattr(Tracking, "_handle", handle)

    outcomes: list[Any] = []
    async with Tracking(settings, [TensorBoardTracker(tmp_path / "tb")], TrackOptions(max_jobs=1)) as tracking:
        await asyncio.wait_for(tracking.run(outcomes.append), 30)
    assert [(o.job_id, o.trackers) for o in outcomes] == [(job_id, {"tensorboard": "present"})]
    consumer = await js.consumer_info(topology.events_stream, durable)
    # One message, delivered twice, acknowledged.
    assert consumer.delivered.consumer_seq == 2 and (consumer.num_pending, consumer.num_ack_pending) == (0, 0)

    subject = topology.event_subject(job_id, "tracked", team="ml")
    info = await js.stream_info(topology.events_stream, subjects_filter=subject)
    assert (info.state.subjects or {}).get(subject) == 1
    stored = decode_event((await js.get_last_msg(topology.events_stream, subject)).data)
    assert isinstance(stored, Tracked)
    assert (stored.trackers, stored.attempt, stored.labels, stored.worker) == (["tensorboard"], 1, labels, None)
    assert stored.team == "ml"
