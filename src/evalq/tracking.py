"""`evalq track`: log each completed job's metrics to experiment trackers, at its training step.

A durable pull consumer, `<prefix>-track-<name>`, on the events stream, filtered to
`<prefix>.events.*.*.completed` (every team's), reads the completed events in order; each is
written to every tracker, then acknowledged. While the tracker is down the consumer keeps its
place, so nothing is missed. Each tracker's write is idempotent per job (a marker it can find again
in its own store), so a crash between writing and acknowledging never logs a job twice.

The step comes from a label (`step` by default) and the run from another (`run`); the
other labels and the job id go along as tags (TensorBoard: a text summary).

Once the trackers hold a job, a `tracked` event says so (`<prefix>.events.<team>.<job_id>.tracked`),
before the ack: the end of the checkpoint's turnaround (`turnaround.py`). A job is in the
trackers within milliseconds of its `completed` event: the pull waits on the server and
returns as the event is stored, and each tracker writes one job at once, nothing batched.

A job that a tracker can never log (a step out of every tracker's range, a metric name the
tracker refuses) is reported as skipped, with its reason, and acknowledged: retried, it
would hold back every job after it. A tracker that is away (I/O, a server restarting) is
retried, the message kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import api
from nats.js.errors import NotFoundError

from . import jetstream
from .config import Settings
from .connection import connect
from .errors import ConfigError, EvalqError, MissingExtra, Unavailable
from .extras import install_command
from .schemas import Completed, Tracked, decode_event, encode, now
from .text import escape_control
from .topology import Topology, consumer_filters

__all__ = [
    "JobMetrics",
    "MissingExtra",
    "MlflowTracker",
    "TensorBoardTracker",
    "TrackOptions",
    "Tracker",
    "Tracking",
    "Unloggable",
    "WandbTracker",
    "job_metrics",
    "parse_step",
]

log = logging.getLogger("evalq.tracking")


# The largest step every tracker keeps as it is: TensorBoard's event and MLflow's metric hold
# it as an int64 (protobuf, and BIGINT in MLflow's SQL store), and W&B turns a larger int
# into a float. Steps are counted from 0.
MAX_STEP = 2**63 - 1


class Unloggable(Exception):
    """A job that a tracker can never log, whatever is retried: its step or a name is out of
    the tracker's range. The message says why; the job is skipped, not retried."""


def _missing(extra: str) -> MissingExtra:
    return MissingExtra(extra, f"the {extra} tracker needs its library: {install_command(extra)}")


@dataclass(frozen=True)
class JobMetrics:
    """One completed job, as the trackers log it."""

    job_id: str
    run: str
    step: int
    # `eval/<task>/<metric>` -> value; numbers only.
    metrics: dict[str, float]
    labels: dict[str, str]
    # Seconds since the epoch at which the job completed: every tracker's timestamp for it,
    # so a second write of the same job is recognisable as the same.
    time: float


def _epoch(text: str) -> float:
    import datetime as _dt

    return _dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def parse_step(text: str, label: str = "step") -> int:
    """The step a label holds, for every tracker; Unloggable unless it is 0 to MAX_STEP in digits."""
    # ASCII digits only: int() would also take a sign, spaces, underscores and other scripts' digits.
    if text.isascii() and text.isdigit() and int(text) <= MAX_STEP:
        return int(text)
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise Unloggable(f"its {label!r} label {shown!r} is not a whole number from 0 to {MAX_STEP}")


def job_metrics(event: Completed, *, step_label: str = "step", run_label: str = "run") -> JobMetrics | None:
    """What the trackers log for `event`; None when it has no step label, Unloggable when the
    label holds no step a tracker takes."""
    raw = event.labels.get(step_label)
    if raw is None:
        return None
    step = parse_step(raw, step_label)
    metrics: dict[str, float] = {}
    for task, values in event.metrics.items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"eval/{task}/{name}"] = float(value)
    return JobMetrics(
        job_id=event.job_id,
        run=event.labels.get(run_label) or "default",
        step=step,
        metrics=metrics,
        labels=dict(event.labels),
        time=_epoch(event.time),
    )


class Tracker(Protocol):
    name: str

    def log(self, job: JobMetrics) -> bool:
        """Write `job` unless this tracker holds it already; True when it wrote it."""
        ...

    def close(self) -> None: ...


def _safe(name: str) -> str:
    """A run name as one folder name."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "_"


# --- TensorBoard ---------------------------------------------------------------------


class TensorBoardTracker:
    """One event file per job, `<logdir>/<run>/events.out.tfevents.<time>.<host>.evalq-<job_id>`.

    The file is written under a name TensorBoard does not read and renamed into place, so it
    is there whole or not at all: its name is the job's marker.
    """

    name = "tensorboard"

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._tensor_pb2, self._shape_pb2 = tensor_pb2, tensor_shape_pb2
        self._record_writer = RecordWriter
        self.logdir = Path(logdir)

    def _text(self, tag: str, text: str) -> Any:
        s = self._summary_pb2
        tensor = self._tensor_pb2.TensorProto(
            dtype=7,  # DT_STRING
            string_val=[text.encode()],
            tensor_shape=self._shape_pb2.TensorShapeProto(),
        )
        metadata = s.SummaryMetadata(plugin_data=s.SummaryMetadata.PluginData(plugin_name="text"))
        return s.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)

    def log(self, job: JobMetrics) -> bool:
        folder = self.logdir / _safe(job.run)
        marker = f".evalq-{job.job_id}"
        folder.mkdir(parents=True, exist_ok=True)
        if any(path.name.endswith(marker) for path in folder.iterdir()):
            return False
        ev, s = self._event_pb2, self._summary_pb2
        tags = {"job_id": job.job_id, **job.labels}
        try:
            scalars = [s.Summary.Value(tag=tag, simple_value=value) for tag, value in job.metrics.items()]
            events = [
                ev.Event(wall_time=job.time, file_version="brain.Event:2"),
                ev.Event(wall_time=job.time, step=job.step, summary=s.Summary(value=scalars)),
                ev.Event(
                    wall_time=job.time,
                    step=job.step,
                    summary=s.Summary(value=[self._text("evalq/job", json.dumps(tags, sort_keys=True))]),
                ),
            ]
        except (ValueError, TypeError) as exc:
            # Only the job's own values are read here, no file: it would fail the same way again.
            raise Unloggable(f"TensorBoard cannot hold it: {exc}") from None
        name = f"events.out.tfevents.{int(job.time):010d}.{socket.gethostname()}{marker}"
        partial = folder / f".partial-{job.job_id}"
        with open(partial, "wb") as handle:
            writer = self._record_writer(handle)
            for event in events:
                writer.write(event.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, folder / name)
        return True

    def close(self) -> None:
        pass


# --- MLflow ----------------------------------------------------------------------------


class MlflowTracker:
    """One MLflow run per `run` label (found by its tag `evalq.run`), a metric point per job.

    Every point carries the job's completion time as its timestamp, so a job already logged
    is found in the metric's history (same step, same timestamp) and not logged again; the
    tag `evalq.job.<job_id>` records the job with its labels.
    """

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str = "evalq") -> None:
        try:
            from mlflow.entities import Metric, RunTag
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        self._metric, self._tag = Metric, RunTag
        self._error = MlflowException
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        except MlflowException as exc:
            raise ConfigError(f"MLflow at {tracking_uri!r}: {exc.message}") from None
        self._runs: dict[str, str] = {}

    def run_id(self, run: str) -> str:
        if run not in self._runs:
            # The tag is found by a filter string, where a quote cannot be escaped.
            tag = run.replace("'", "")
            found = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`evalq.run` = '{tag}'", max_results=1
            )
            if found:
                self._runs[run] = found[0].info.run_id
            else:
                created = self.client.create_run(self.experiment_id, run_name=run, tags={"evalq.run": tag})
                self._runs[run] = created.info.run_id
        return self._runs[run]

    def log(self, job: JobMetrics) -> bool:
        try:
            return self._log(job)
        except self._error as exc:
            # MLflow's validation of a name or value (a metric named `exact_match,strict-match`
            # has a comma it refuses): the job's data, not the server, so never accepted.
            if exc.error_code == "INVALID_PARAMETER_VALUE":
                raise Unloggable(f"MLflow refuses it: {exc.message}") from None
            raise

    def _log(self, job: JobMetrics) -> bool:
        run_id = self.run_id(job.run)
        stamp = int(job.time * 1000)
        fresh = []
        for key, value in job.metrics.items():
            history = self.client.get_metric_history(run_id, key)
            if not any(point.step == job.step and point.timestamp == stamp for point in history):
                fresh.append(self._metric(key, value, stamp, job.step))
        tag = f"evalq.job.{job.job_id}"
        if not fresh and tag in self.client.get_run(run_id).data.tags:
            return False
        tags = [self._tag(tag, json.dumps({"step": job.step, "labels": job.labels}, sort_keys=True)[:5000])]
        tags += [self._tag(f"label.{k}", v) for k, v in job.labels.items()]
        self.client.log_batch(run_id, metrics=fresh, tags=tags)
        return bool(fresh)

    def close(self) -> None:
        pass


# --- Weights & Biases --------------------------------------------------------------------


class WandbTracker:
    """One W&B run per `run` label (its id derived from the label), one short session per job.

    Each job's session writes its own run-file (offline: `<dir>/wandb/offline-run-*/run-<id>.wandb`)
    with the job id in its config. A record file `<dir>/evalq-jobs/<job_id>.done` says the job
    is logged; a job with an `.intent` file and no record (a crash in between) is looked for in
    the run files before it is logged again.
    """

    name = "wandb"

    def __init__(self, directory: str | os.PathLike[str], project: str = "evalq", mode: str = "offline") -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        self._wandb = wandb
        # W&B's service process starts here, not in the first job's session: a third of a
        # second off that job's time to its metrics.
        wandb.setup()
        self.dir = Path(directory)
        self.project = project
        self.mode = mode
        self.records = self.dir / "evalq-jobs"

    @staticmethod
    def run_id(run: str) -> str:
        return "evalq-" + hashlib.sha256(run.encode()).hexdigest()[:16]

    def log(self, job: JobMetrics) -> bool:
        self.records.mkdir(parents=True, exist_ok=True)
        done = self.records / f"{job.job_id}.done"
        intent = self.records / f"{job.job_id}.intent"
        if done.exists():
            return False
        if intent.exists() and job.job_id in logged_jobs(self.dir):
            intent.replace(done)
            return False
        intent.write_text(job.run)
        run = self._wandb.init(
            mode=self.mode,  # type: ignore[arg-type]
            dir=str(self.dir),
            project=self.project,
            id=self.run_id(job.run),
            name=job.run,
            resume="allow",
            config={"evalq_job_id": job.job_id, "evalq_labels": job.labels},
            settings=self._wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True),
            reinit="create_new",
        )
        try:
            # Evaluation steps come in any order; a step metric of their own keeps W&B from
            # dropping a step lower than one it has seen.
            run.define_metric("train/global_step")
            run.define_metric("eval/*", step_metric="train/global_step")
            run.log({"train/global_step": job.step, **job.metrics})
        finally:
            run.finish()
        intent.replace(done)
        return True

    def close(self) -> None:
        pass


def wandb_records(directory: str | os.PathLike[str]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each W&B run-file under `directory`: its config and its history rows (values decoded)."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    for path in sorted(Path(directory).glob("wandb/*run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))  # type: ignore[no-untyped-call]
        config: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        try:
            while (data := store.scan_data()) is not None:  # type: ignore[no-untyped-call]
                record = pb.Record()
                record.ParseFromString(data)
                kind = record.WhichOneof("record_type")
                if kind == "history":
                    rows.append(
                        {
                            item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item
                        }
                    )
                elif kind == "run":
                    for item in record.run.config.update:
                        config[item.key] = json.loads(item.value_json)
                elif kind == "config":
                    for item in record.config.update:
                        config[item.key] = json.loads(item.value_json)
        except (AssertionError, ValueError):
            pass  # a file cut short by a crash: what was read is what it holds
        finally:
            store.close()
        yield config, rows


def logged_jobs(directory: str | os.PathLike[str]) -> set[str]:
    """The job ids whose metrics a W&B run-file under `directory` holds."""
    found = set()
    for config, rows in wandb_records(directory):
        job = config.get("evalq_job_id")
        value = job.get("value") if isinstance(job, dict) else job
        if isinstance(value, str) and any(key.startswith("eval/") for row in rows for key in row):
            found.add(value)
    return found


# --- the consumer ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackOptions:
    name: str = "tracker"
    step_label: str = "step"
    run_label: str = "run"
    # Only for a consumer created now: start with the events stored from now on.
    from_now: bool = False
    max_jobs: int | None = None


@dataclass
class Outcome:
    job_id: str
    run: str | None
    step: int | None
    # tracker name -> "logged" | "present" | "skipped"; empty when no tracker was asked.
    trackers: dict[str, str] = field(default_factory=dict)
    # Why the job, or a tracker's part of it, can never be logged; None when nothing was skipped.
    skipped: str | None = None


class Tracking:
    """`async with Tracking(settings, trackers, options) as tracking: await tracking.run()`."""

    def __init__(self, settings: Settings, trackers: list[Tracker], options: TrackOptions | None = None) -> None:
        self.settings = settings
        self.trackers = trackers
        self.options = options or TrackOptions()
        self.topology = Topology.from_settings(settings)
        self._nc: NatsClient | None = None
        self._stop = asyncio.Event()
        # Jobs skipped (wholly or by a tracker) because they can never be logged.
        self.skipped = 0

    @property
    def durable(self) -> str:
        return f"{self.topology.prefix}-track-{self.options.name}"

    async def __aenter__(self) -> Tracking:
        self._nc = await connect(self.settings, name=f"evalq-track-{self.options.name}")
        js = self._nc.jetstream(
            timeout=self.settings.connection.request_timeout, domain=self.settings.connection.js_domain
        )
        stream = self.topology.events_stream
        wanted = self.topology.events_filter(kind="completed")
        try:
            found = await js.consumer_info(stream, self.durable)
        except NotFoundError as exc:
            if exc.err_code != 10014:  # consumer not found; anything else: no stream
                await self.__aexit__(None, None, None)
                raise Unavailable(
                    f"the events stream {stream} does not exist: start a gateway with prefix "
                    f"{self.topology.prefix!r} first"
                ) from None
            await js.add_consumer(
                stream,
                api.ConsumerConfig(
                    durable_name=self.durable,
                    description="evalq track: completed jobs logged to experiment trackers",
                    filter_subject=wanted,
                    deliver_policy=api.DeliverPolicy.NEW if self.options.from_now else api.DeliverPolicy.ALL,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=60.0,
                    max_ack_pending=1,
                    max_deliver=-1,
                ),
            )
        else:
            if consumer_filters(found.config) != [wanted]:
                # Made for an older layout of the events' subjects: it would hear nothing.
                log.info("tracker consumer %s now follows %s", self.durable, wanted)
                moved = dataclasses.replace(found.config, filter_subject=wanted, filter_subjects=None)
                await js.add_consumer(stream, moved)
        self._sub = await js.pull_subscribe_bind(self.durable, stream)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for tracker in self.trackers:
            with contextlib.suppress(Exception):
                tracker.close()
        nc, self._nc = self._nc, None
        if nc is not None:
            # Every message taken was acknowledged before the next fetch: nothing to drain, and
            # draining a pull subscription waits out its last long poll.
            with contextlib.suppress(Exception):
                await nc.close()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_job: Callable[[Outcome], None] | None = None) -> int:
        """Log completed jobs until stopped (or `max_jobs` handled); returns how many were handled."""
        handled = 0
        while not self._stop.is_set():
            if self.options.max_jobs is not None and handled >= self.options.max_jobs:
                break
            try:
                messages = await self._sub.fetch(1, timeout=1.0)
            except TimeoutError:
                continue
            except nats.errors.Error as exc:
                # Reconnecting, or a JetStream leader being elected: the consumer keeps its place.
                log.warning("fetching completed jobs: %s; trying again", exc)
                await asyncio.sleep(1.0)
                continue
            for msg in messages:
                outcome = await self._handle(msg.data, msg)
                await msg.ack_sync(timeout=self.settings.connection.request_timeout)
                handled += 1
                if on_job is not None:
                    on_job(outcome)
        return handled

    async def _handle(self, data: bytes, msg: Any) -> Outcome:
        event = decode_event(data)
        if not isinstance(event, Completed):
            return Outcome(event.job_id, None, None)
        run = event.labels.get(self.options.run_label)
        try:
            job = job_metrics(event, step_label=self.options.step_label, run_label=self.options.run_label)
        except Unloggable as exc:
            return self._skip(Outcome(event.job_id, run, None), str(exc))
        if job is None:
            log.warning("job %s has no %r label: not logged", event.job_id, self.options.step_label)
            return Outcome(event.job_id, run, None)
        outcome = Outcome(job.job_id, job.run, job.step)
        reasons = []
        for tracker in self.trackers:
            delay = 1.0
            while True:
                started = time.monotonic()
                try:
                    wrote: bool | None = await asyncio.to_thread(tracker.log, job)
                    break
                except Unloggable as exc:
                    reasons.append(f"{tracker.name}: {exc}")
                    wrote = None
                    break
                except EvalqError:
                    raise
                except Exception as exc:
                    # A tracker that is away (an MLflow server restarting): keep the message
                    # and try again, so the jobs stay in order and none is skipped.
                    log.warning("%s could not log job %s (%s); retrying in %.0fs", tracker.name, job.job_id, exc, delay)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    if self._stop.is_set():
                        raise
                finally:
                    if time.monotonic() - started > 20:
                        with contextlib.suppress(Exception):
                            await msg.in_progress()
            outcome.trackers[tracker.name] = "skipped" if wrote is None else "logged" if wrote else "present"
        await self._record(event, outcome)
        return self._skip(outcome, "; ".join(reasons)) if reasons else outcome

    async def _record(self, event: Completed, outcome: Outcome) -> None:
        """Publish the job's `tracked` event: when its metrics were in the trackers that hold them.

        Before the ack, so a crash in between loses no record; the redelivery publishes the
        same message id, which the stream keeps once (within its duplicate window). The id
        holds this tracker's name: two trackers each record their own.
        """
        held = [name for name, state in outcome.trackers.items() if state != "skipped"]
        if not held or self._nc is None:
            return
        tracked = Tracked(
            job_id=event.job_id, time=now(), attempt=event.attempt, labels=event.labels, team=event.team, trackers=held
        )
        write = jetstream.Write(
            self.topology.event_subject(event.job_id, "tracked", team=event.team),
            encode(tracked),
            {"Nats-Msg-Id": f"{event.job_id}.tracked.{self.options.name}"},
            stream=self.topology.events_stream,
        )
        try:
            await jetstream.publish(self._nc, write, timeout=self.settings.connection.request_timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            # The metrics are in the trackers: a missing record costs only the turnaround's
            # last part, so the job is acknowledged all the same.
            log.warning("job %s is logged, but its tracked event was not published: %s", event.job_id, exc)

    def _skip(self, outcome: Outcome, reason: str) -> Outcome:
        outcome.skipped = escape_control(reason)
        self.skipped += 1
        log.warning("job %s skipped, it can never be logged: %s", escape_control(outcome.job_id), outcome.skipped)
        return outcome
