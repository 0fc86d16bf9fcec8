"""evalq: a durable job queue for lmms-eval evaluations over NATS JetStream."""

# The one place the version is written: the package metadata reads it (pyproject.toml),
# `evalq --version` prints it, the gateway reports it and each worker registers it.
__version__ = "0.1.0"

from .config import Settings, load_settings
from .errors import (
    BadRequest,
    ConfigError,
    Conflict,
    ConnectError,
    EvalqError,
    InvalidField,
    JobCancelled,
    JobFailed,
    JobNotFound,
    RequestError,
    ServerNotFound,
    Timeout,
    TooLarge,
    Unavailable,
    WrongState,
)
from .policy import PoolPolicy
from .publisher import Artifact, AsyncClient, Client
from .schemas import (
    CancelReply,
    EvaluateRequest,
    Event,
    Health,
    JobAccepted,
    JobInfo,
    JobResult,
    Piece,
    Progress,
    QueueStatus,
    ShardCompleted,
    ShardFailed,
    ShardStarted,
    WorkerInfo,
)
from .topology import Topology

__all__ = [
    "Artifact",
    "AsyncClient",
    "BadRequest",
    "CancelReply",
    "Client",
    "ConfigError",
    "Conflict",
    "ConnectError",
    "EvalqError",
    "EvaluateRequest",
    "Event",
    "Health",
    "InvalidField",
    "JobAccepted",
    "JobCancelled",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "JobResult",
    "Piece",
    "PoolPolicy",
    "Progress",
    "QueueStatus",
    "RequestError",
    "ServerNotFound",
    "Settings",
    "ShardCompleted",
    "ShardFailed",
    "ShardStarted",
    "Timeout",
    "TooLarge",
    "Topology",
    "Unavailable",
    "WorkerInfo",
    "WrongState",
    "__version__",
    "load_settings",
]
