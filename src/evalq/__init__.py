"""evalq: a durable job queue for lmms-eval evaluations over NATS JetStream."""

__version__ = "0.1.0"

from .config import Settings, load_settings  # noqa: E402
from .errors import (  # noqa: E402
    BadRequest,
    ConfigError,
    ConnectError,
    EvalqError,
    InvalidField,
    JobCancelled,
    JobFailed,
    JobNotFound,
    RequestError,
    ServerNotFound,
    TooLarge,
    Unavailable,
    WrongState,
)
from .publisher import AsyncClient, Client  # noqa: E402
from .schemas import (  # noqa: E402
    CancelReply,
    Event,
    EvaluateRequest,
    Health,
    JobAccepted,
    JobInfo,
    JobResult,
    Progress,
    QueueStatus,
    WorkerInfo,
)
from .topology import Topology  # noqa: E402

__all__ = [
    "AsyncClient",
    "BadRequest",
    "CancelReply",
    "Client",
    "ConfigError",
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
    "Progress",
    "QueueStatus",
    "RequestError",
    "ServerNotFound",
    "Settings",
    "TooLarge",
    "Topology",
    "Unavailable",
    "WorkerInfo",
    "WrongState",
    "__version__",
    "load_settings",
]
