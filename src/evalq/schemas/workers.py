"""The wire types of workers: a worker's registry entry, and `evalq setup`'s word with them."""

from __future__ import annotations

from .wire import Wire

__all__ = ["Announcement", "Confirmation", "GpuInfo", "WorkerInfo"]


class GpuInfo(Wire, frozen=True, kw_only=True):
    index: int
    name: str
    memory_mb: int


class WorkerInfo(Wire, frozen=True, kw_only=True):
    """A worker's entry in the `<prefix>-workers` bucket, refreshed every heartbeat."""

    worker_id: str
    host: str
    pid: int
    pool: str = "default"
    version: str = ""
    lmms_eval_version: str | None = None
    gpu_count: int = 0
    gpus: list[GpuInfo] = []
    # None until the worker has listed them (that takes lmms-eval seconds to index).
    models: list[str] | None = None
    tasks: list[str] | None = None
    current_job: str | None = None
    started_at: str = ""
    heartbeat_at: str = ""
    # Seconds the entry lives after each write (three heartbeats), as its `Nats-TTL` says;
    # readers that follow the bucket expire it by the same rule. None from older workers.
    ttl: float | None = None


class Announcement(Wire, frozen=True, kw_only=True):
    """From `evalq setup` to a pool's workers (`<prefix>.control.ack_wait.<pool>`): the lower
    ack_wait it is about to apply."""

    pool: str
    ack_wait: float


class Confirmation(Wire, frozen=True, kw_only=True):
    """A worker's answer, sent once it has renewed its message and renews for `ack_wait`."""

    worker_id: str
    ack_wait: float
    # A message in hand (a job's, or a piece's, from the moment it is taken), and its job.
    holding: bool = False
    job_id: str | None = None
