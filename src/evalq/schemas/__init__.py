"""Every wire type, as msgspec Structs, with one encoder and decoder each.

These shapes are the contract in docs/DESIGN.md: users script against the field names.
Structs are frozen and keyword-only; requests refuse unknown fields so a typo never
passes silently. Constraints live in the types, so a refusal always carries a JSON path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec
from msgspec import Meta, Struct

from ..fields import (
    CONTROL,
    JOB_ID_SEGMENT,
    ArgDict,
    ArgString,
    BatchSize,
    Device,
    JobId,
    Labels,
    Limit,
    Name,
    OutputDir,
    PoolName,
    Priority,
    check_args,
    format_args,
)
from .gates import (
    GateCheck,
    GateGet,
    GateList,
    GateName,
    GateOp,
    GatePolicy,
    GateRule,
    GateSet,
    GatesReply,
    RuleOutcome,
    RuleStatus,
    Verdict,
    VerdictName,
)
from .history import JOBS_PAGE_MAX, JobsPage, JobsQuery, JobSummary, QueuedRow, TeamsReply, TeamUse
from .notify import (
    Delivery,
    DeliveryFailure,
    NotifyAdd,
    NotifyFailures,
    NotifyList,
    NotifyOp,
    NotifyRemove,
    NotifyReply,
    NotifyRetry,
    Subscription,
    SubscriptionView,
)
from .reads import (
    Chunk,
    ChunkReply,
    EventsPage,
    ObjectReply,
    ReadChunk,
    ReadEvents,
    ReadLast,
    ReadObject,
    ReadOp,
    StoredEvent,
    decode_read_op,
)
from .wire import TERMINAL, CreationClock, JobStatus, Progress, Wire, now
from .workers import Announcement, Confirmation, GpuInfo, WorkerInfo

__all__ = [
    "JOBS_PAGE_MAX",
    "TERMINAL",
    "Announcement",
    "CacheMode",
    "CancelReply",
    "Cancelled",
    "Chunk",
    "ChunkReply",
    "Completed",
    "Confirmation",
    "CreationClock",
    "Delivery",
    "DeliveryFailure",
    "EvaluateRequest",
    "Event",
    "EventsPage",
    "Failed",
    "GateCheck",
    "GateGet",
    "GateList",
    "GateName",
    "GateOp",
    "GatePolicy",
    "GateRule",
    "GateSet",
    "Gated",
    "GatesReply",
    "GpuInfo",
    "Health",
    "JobAccepted",
    "JobInfo",
    "JobRef",
    "JobResult",
    "JobStatus",
    "JobSummary",
    "JobsPage",
    "JobsQuery",
    "ModelsReply",
    "NotifyAdd",
    "NotifyFailures",
    "NotifyList",
    "NotifyOp",
    "NotifyRemove",
    "NotifyReply",
    "NotifyRetry",
    "ObjectReply",
    "Piece",
    "PieceItem",
    "PieceStatus",
    "Progress",
    "ProgressEvent",
    "QueueStatus",
    "Queued",
    "QueuedRow",
    "ReadChunk",
    "ReadEvents",
    "ReadLast",
    "ReadObject",
    "ReadOp",
    "Requeued",
    "RuleOutcome",
    "RuleStatus",
    "ShardCompleted",
    "ShardFailed",
    "ShardStarted",
    "Stalled",
    "Started",
    "StoredEvent",
    "Subscription",
    "SubscriptionView",
    "TasksReply",
    "TeamUse",
    "TeamsReply",
    "Tracked",
    "Verdict",
    "VerdictName",
    "Work",
    "WorkItem",
    "WorkerInfo",
    "decode",
    "decode_event",
    "decode_gate_op",
    "decode_notify_op",
    "decode_read_op",
    "encode",
    "error_path",
    "event_type",
    "format_args",
    "now",
]

CacheMode = Literal["off", "read", "read-write", "refresh"]
# --- requests ------------------------------------------------------------------------


class EvaluateRequest(Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A job: lmms-eval's evaluate arguments, with the same names, plus `pool` and `labels`."""

    model: Name
    tasks: Annotated[list[Name], Meta(min_length=1, max_length=64)]
    model_args: ArgDict | ArgString | None = None
    num_fewshot: Annotated[int, Meta(ge=0, le=1024)] | None = None
    batch_size: BatchSize | None = None
    device: Device | None = None
    limit: Limit | None = None
    gen_kwargs: ArgDict | ArgString | None = None
    log_samples: bool = True
    predict_only: bool = False
    num_gpus: Annotated[int, Meta(ge=1, le=64)] = 1
    output_dir: OutputDir | None = None
    pool: PoolName = "default"
    labels: Labels = {}
    # Seconds the evaluation may run before its worker ends it; the pool's policy gives a
    # default and a maximum (policy.py).
    timeout: Annotated[int, Meta(ge=1, le=30 * 86400)] | None = None
    # Split the evaluation into at most this many pieces, run by any workers of the pool
    # at once and merged exactly (sharding.py); 1 runs it whole on one worker.
    shards: Annotated[int, Meta(ge=1, le=256)] = 1
    # Load the model afresh for this job, even where the worker keeps the same one loaded.
    fresh_model: bool = False
    # The response cache (DESIGN.md, "The response journal"): `off`; `read` reuses answers
    # other jobs gave to the same request of the same model; `read-write` also adds this
    # job's; `refresh` computes everything and writes it. None: the pool's default.
    cache: CacheMode | None = None
    # Seeds python, numpy, torch and few-shot sampling (lmms-eval's `--seed`). A request that
    # names one may have its sampled answers cached; without one only deterministic ones are.
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    # A re-score: score again, with today's task code, the responses that this completed job
    # recorded; no model is loaded and nothing is asked of one.
    rescore_of: JobId | None = None
    # Which jobs of the pool run first (DESIGN.md, "Scheduling"); the pool's policy caps it
    # per team.
    priority: Priority = "normal"
    # The stored gate policy (`evalq gate set`) that gives the job a verdict when it completes.
    gate: GateName | None = None

    def __post_init__(self) -> None:
        if self.rescore_of is not None and self.shards > 1:
            raise ValueError("Expected shards of 1 for a re-score: it loads no model and runs whole - at `$.shards`")
        for field in ("model_args", "gen_kwargs"):
            check_args(getattr(self, field), field)
        if self.output_dir is not None and any(JOB_ID_SEGMENT.fullmatch(part) for part in self.output_dir.split("/")):
            # A job's folder is `<output_dir>/<job_id>`: a segment shaped like a job id could
            # put this job's folder inside another job's, and its results in place of theirs.
            raise ValueError("Expected no folder shaped like a job id - at `$.output_dir`")
        for key, value in self.labels.items():
            if CONTROL.search(value):
                # Labels are echoed in every event: a control character would forge lines or
                # send escapes to the terminal of whoever follows them.
                raise ValueError(f"Expected a label with no control character - at `$.labels.{key}`")


class Work(Wire, frozen=True, kw_only=True):
    """An evaluation's work, by where each answer came from: model responses computed, resumed
    from its own journal (an earlier attempt's, or a re-score's source), or reused from the
    cache; and document scores computed, or reused from its journal. A sharded job's is its
    pieces', summed (its merge computes nothing)."""

    responses_computed: int = 0
    responses_resumed: int = 0
    responses_reused: int = 0
    scores_computed: int = 0
    scores_reused: int = 0


class JobRef(Wire, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of `status` and `cancel`."""

    job_id: JobId


class WorkItem(Wire, frozen=True, kw_only=True):
    """The message stored in a pool's work stream: what a worker needs to run the job."""

    job_id: JobId
    request: EvaluateRequest
    created_at: str


# `held`: its team's `max_running_gpus` holds it back; the dispatcher releases it (`queued`,
# its message published) when the quota has room.
PieceStatus = Literal["held", "queued", "running", "completed", "failed", "cancelled"]


class Piece(Wire, frozen=True, kw_only=True):
    """One piece of a sharded job: whole tasks (`limit`: the most documents any of them runs),
    or one task's documents `[offset, offset+limit)`."""

    index: int
    tasks: list[str]
    offset: int | None = None
    limit: int | None = None
    docs: int
    status: PieceStatus = "queued"
    attempts: int = 0
    worker: str | None = None
    done: int = 0
    started_at: str | None = None
    completed_at: str | None = None
    seconds: float | None = None
    error: str | None = None
    work: Work | None = None
    # When the dispatcher released it from `held` (its message is then the dispatcher's).
    released_at: str | None = None


class PieceItem(Wire, frozen=True, kw_only=True):
    """A message of a pool's pieces stream: run piece `index` of a job, or (`merge`) merge them."""

    job_id: JobId
    step: Literal["piece", "merge"] = "piece"
    index: int = 0


# --- replies -------------------------------------------------------------------------


class JobAccepted(Wire, frozen=True, kw_only=True):
    job_id: str
    # "queued" for a new job; a duplicate submission reports the job's current status.
    status: JobStatus = "queued"
    position_in_queue: int | None = None
    stream_seq: int
    duplicate: bool = False
    message: str = "Job queued"
    waiting: str | None = None


class JobResult(Wire, frozen=True, kw_only=True):
    """What a completed job produced: lmms-eval's `results` section, and artifact names."""

    metrics: dict[str, dict[str, Any]] = {}
    artifacts: list[str] = []
    duration_s: float | None = None
    # Where its answers came from (a sharded job's: its pieces' and its merge's, summed).
    work: Work | None = None


class JobInfo(Wire, frozen=True, kw_only=True):
    """The record kept in the `<prefix>-jobs` bucket and returned by `status`."""

    job_id: str
    status: JobStatus
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    request: EvaluateRequest | None = None
    result: JobResult | None = None
    error: str | None = None
    position_in_queue: int | None = None
    attempts: int = 0
    worker: str | None = None
    progress: Progress | None = None
    stream_seq: int | None = None
    labels: dict[str, str] = {}
    pool: str = "default"
    cancel_requested_at: str | None = None
    # When its progress last moved, while it has not moved for its pool's `stall_after_s`;
    # None once it moves again (or never stalled).
    stalled_since: str | None = None
    # Sharded jobs: the number of pieces (the request's `shards` until the job is planned),
    # how many have completed, and each piece's state.
    shards: int = 1
    shards_done: int = 0
    pieces: list[Piece] = []
    # Who submitted it, as nats-server stated it (never the request): the requester's
    # account, and its user where the import shares it. `default` and None without one.
    team: str = "default"
    user: str | None = None
    # When the scheduler let it into the work stream (None while it waits for its turn);
    # when a higher priority asked for its worker, and how many times it gave it up.
    admitted_at: str | None = None
    preempt_requested_at: str | None = None
    preemptions: int = 0
    # Why a queued job waits (`status` only): behind higher priority, fair share, a quota.
    waiting: str | None = None
    # Its gate's verdict, once the job completed and was judged (`request.gate`).
    verdict: Verdict | None = None


class CancelReply(Wire, frozen=True, kw_only=True):
    job_id: str
    status: JobStatus
    message: str


class QueueStatus(Wire, frozen=True, kw_only=True):
    queue_size: int
    queued_jobs: dict[str, list[str]]
    running_jobs: list[str]
    completed_jobs: int
    failed_jobs: int
    cancelled_jobs: int
    workers: list[WorkerInfo]
    # Each pool's waiting jobs in the order they will start (the first 1,000).
    queue: dict[str, list[QueuedRow]] = {}


class Health(Wire, frozen=True, kw_only=True):
    status: Literal["healthy", "degraded"]
    timestamp: str
    version: str
    pools: list[str]
    queue_size: int
    workers: list[WorkerInfo]


class TasksReply(Wire, frozen=True, kw_only=True):
    tasks: list[str]


class ModelsReply(Wire, frozen=True, kw_only=True):
    models: list[str]


# --- events: a tagged union on "type" ------------------------------------------------


class _EventBase(Struct, frozen=True, kw_only=True, tag_field="type"):
    job_id: str
    time: str
    attempt: int = 0
    worker: str | None = None
    labels: dict[str, str] = {}
    # The job's team: the team token of the event's subject, so each account reads only its own.
    team: str = "default"


class Queued(_EventBase, frozen=True, kw_only=True, tag="queued"):
    pool: str = "default"
    position_in_queue: int | None = None
    stream_seq: int | None = None


class Started(_EventBase, frozen=True, kw_only=True, tag="started"):
    # Whether the worker's resident model served this job, and how long loading took when
    # it was loaded for it (null where the model is built inside a fresh process).
    model_reused: bool | None = None
    model_load_seconds: float | None = None
    # Whether the resident model took this job's checkpoint's weights in place (another
    # checkpoint of the model it held; `model_load_seconds` is then the swap's), and why a
    # swap that was considered was not made (the model was loaded afresh).
    weights_swapped: bool | None = None
    model_note: str | None = None
    # What this attempt takes from the job's journal (an earlier attempt's work), and
    # whether it loads a model at all (a re-score does not).
    resumed_responses: int = 0
    resumed_scores: int = 0
    loads_model: bool = True


class ProgressEvent(_EventBase, frozen=True, kw_only=True, tag="progress"):
    progress: Progress


class Requeued(_EventBase, frozen=True, kw_only=True, tag="requeued"):
    reason: str


class Stalled(_EventBase, frozen=True, kw_only=True, tag="stalled"):
    # When its progress last moved, and for how long it had not when this was said.
    since: str
    seconds: float
    # What the pool's policy does about it: `report` (this event and the record's mark), or
    # `fail` (the evaluation is stopped, and a `failed` event follows).
    action: Literal["report", "fail"] = "report"


class Completed(_EventBase, frozen=True, kw_only=True, tag="completed"):
    metrics: dict[str, dict[str, Any]] = {}
    artifacts: list[str] = []
    duration_s: float | None = None
    work: Work | None = None


class Failed(_EventBase, frozen=True, kw_only=True, tag="failed"):
    error: str
    exit_code: int | None = None
    log_tail: str | None = None


class Cancelled(_EventBase, frozen=True, kw_only=True, tag="cancelled"):
    reason: str = "cancelled by request"
    # From the cancel request to the end of the evaluation's processes, when it was running.
    cancel_latency_s: float | None = None


class ShardStarted(_EventBase, frozen=True, kw_only=True, tag="shard_started"):
    shard: int
    shards: int


class ShardCompleted(_EventBase, frozen=True, kw_only=True, tag="shard_completed"):
    shard: int
    seconds: float | None = None


class ShardFailed(_EventBase, frozen=True, kw_only=True, tag="shard_failed"):
    shard: int
    error: str


class Gated(_EventBase, frozen=True, kw_only=True, tag="gated"):
    """A completed job's verdict under its gate (after `completed`)."""

    verdict: Verdict


class Tracked(_EventBase, frozen=True, kw_only=True, tag="tracked"):
    # `evalq track` has the job's metrics in these trackers (`tensorboard`, `mlflow`, `wandb`);
    # its `time` is when they held them, the end of the checkpoint's turnaround.
    trackers: list[str] = []


Event = Union[
    Queued,
    Started,
    ProgressEvent,
    Stalled,
    Requeued,
    ShardStarted,
    ShardCompleted,
    ShardFailed,
    Completed,
    Failed,
    Cancelled,
    Tracked,
    Gated,
]
TERMINAL_EVENTS: tuple[type, ...] = (Completed, Failed, Cancelled)

# --- encoders and decoders, built once -----------------------------------------------

_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)  # type: ignore[arg-type]
_gate_op_decoder: msgspec.json.Decoder[GateOp] = msgspec.json.Decoder(GateOp)  # type: ignore[arg-type]
_notify_op_decoder: msgspec.json.Decoder[NotifyOp] = msgspec.json.Decoder(NotifyOp)  # type: ignore[arg-type]
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t)
    for t in (
        EvaluateRequest,
        JobRef,
        JobsQuery,
        JobsPage,
        WorkItem,
        PieceItem,
        JobAccepted,
        JobInfo,
        CancelReply,
        WorkerInfo,
        Announcement,
        Confirmation,
        QueueStatus,
        Health,
        TasksReply,
        ModelsReply,
        TeamsReply,
        EventsPage,
        ObjectReply,
        ChunkReply,
        GatePolicy,
        GatesReply,
        Verdict,
        Subscription,
        Delivery,
        DeliveryFailure,
        NotifyReply,
    )
}

T = TypeVar("T")


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes | str, type: type[T]) -> T:
    """Decode JSON into `type`; raises msgspec.DecodeError / ValidationError with a path."""
    return _decoders[type].decode(_utf8(data))  # type: ignore[no-any-return]


def event_type(event: Event) -> str:
    """An event's `type`: its tag (`completed`, `gated`, ...)."""
    return str(type(event).__struct_config__.tag)


def decode_event(data: bytes | str) -> Event:
    return _event_decoder.decode(_utf8(data))


def decode_gate_op(data: bytes | str) -> GateOp:
    """The body of the `gate` endpoint."""
    return _gate_op_decoder.decode(_utf8(data))


def decode_notify_op(data: bytes | str) -> NotifyOp:
    """The body of the `notify` endpoint."""
    return _notify_op_decoder.decode(_utf8(data))


def _utf8(data: bytes | str) -> bytes | str:
    # msgspec 0.22 corrupts its heap when a string field holds invalid UTF-8 (the process
    # aborts later), so untrusted bytes are checked here, before msgspec sees them.
    if isinstance(data, str):
        return data
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise msgspec.DecodeError(f"Body is not valid UTF-8 (byte {exc.start})") from None
    return data


# msgspec ends a message with "- at `$.path`", or "- at `key` in `$.path`" for a dict key.
_PATH = re.compile(r" - at (?:`key` in )?`(\$[^`]*)`\Z")


def error_path(error: msgspec.DecodeError) -> tuple[str, str]:
    """Split msgspec's message into (message, JSON path); the path is `$` when none is given."""
    text = str(error)
    match = _PATH.search(text)
    if match:
        return text[: match.start()], match.group(1)
    return text, "$"
