"""Every error evalq raises, under one root.

::

    EvalqError
    ├── ConfigError             settings that cannot be used (bad TOML, bad value, missing file)
    │   └── MissingExtra        an optional install a command needs is missing; says the pip command
    ├── ServerNotFound          the embedded nats-server binary is missing or did not start
    ├── StoreLocked             another evalq server holds the embedded server's store (its lock file)
    ├── ConnectError            no connection to NATS (none answered, or it closed); carries a hint
    ├── Timeout                 no answer in time (a request, or wait_for_job); also a TimeoutError
    ├── RequestError            a refusal, with code, message and path: the gateway's error reply,
    │   │                       or the SDK's own 503 when nothing serves the request
    │   ├── BadRequest          400: the body is not JSON (or not UTF-8); a bad Idempotency-Key
    │   ├── JobNotFound         404: no such job
    │   ├── WrongState          409: the job is in a state that does not allow this
    │   ├── TooLarge            413: the body is over the gateway's size limit
    │   ├── InvalidField        422: a field is missing, unknown or out of range; no worker offers it
    │   ├── QuotaExceeded       429: the team's quota of queued jobs in the pool is used up; names it
    │   └── Unavailable         503: the queue is full, JetStream did not answer, no gateway
    │                           answers, or the queue's JetStream objects are missing
    ├── AmbiguousJobId          a short job id that starts more than one job's id; lists them
    ├── Conflict                a compare-and-set on a job's record kept losing the race (409 at the gateway)
    ├── Unconfirmed             evalq setup: workers running a job did not confirm a lower ack_wait; nothing changed
    ├── JobFailed               wait_for_job: the job ended ``failed``
    └── JobCancelled            wait_for_job: the job ended ``cancelled``

The gateway turns these into error replies at one place (``gateway/service.py``,
``as_request_error``) and the publisher turns error replies back into them
(``RequestError.for_code``), so both sides agree on the codes. The SDK maps every NATS
error to one of these at one place too (``publisher/client.py``), so a caller of
``AsyncClient`` or ``Client`` catches ``EvalqError`` and nothing else.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AmbiguousJobId",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "ConnectError",
    "EvalqError",
    "InvalidField",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "MissingExtra",
    "QuotaExceeded",
    "RequestError",
    "ServerNotFound",
    "StoreLocked",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "Unconfirmed",
    "WrongState",
]


class EvalqError(Exception):
    """The root of every error evalq raises on purpose."""


class ConfigError(EvalqError):
    pass


class MissingExtra(ConfigError):
    """An optional install (`evalq[<extra>]`) that a command needs is missing; the message is
    the pip command that installs it."""

    def __init__(self, extra: str, message: str) -> None:
        super().__init__(message)
        self.extra = extra


class ServerNotFound(EvalqError):
    pass


class StoreLocked(EvalqError):
    """Another process holds the store's lock; a second server would corrupt the store."""


class ConnectError(EvalqError):
    pass


class Timeout(EvalqError, TimeoutError):
    """No answer in time; a TimeoutError too, so `except TimeoutError` still catches it."""


class RequestError(EvalqError):
    """A refusal, with the code, message and JSON path of the error reply."""

    code: int = 500

    def __init__(self, message: str, *, path: str | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        where = f" (at {self.path})" if self.path and self.path != "$" else ""
        return f"{self.code}: {self.message}{where}"

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "path": self.path or "$"}}

    @staticmethod
    def for_code(code: int, message: str, path: str | None = None) -> RequestError:
        cls = _BY_CODE.get(code, RequestError)
        return cls(message, path=path, code=code)


class BadRequest(RequestError):
    code = 400


class JobNotFound(RequestError):
    code = 404


class WrongState(RequestError):
    code = 409


class TooLarge(RequestError):
    code = 413


class InvalidField(RequestError):
    code = 422


class QuotaExceeded(RequestError):
    code = 429


class Unavailable(RequestError):
    code = 503


_BY_CODE: dict[int, type[RequestError]] = {
    cls.code: cls for cls in (BadRequest, JobNotFound, WrongState, TooLarge, InvalidField, QuotaExceeded, Unavailable)
}


class Conflict(EvalqError):
    """A compare-and-set kept losing the race."""


class AmbiguousJobId(EvalqError):
    """A short id that more than one job's id starts with; `candidates` are their summaries."""

    def __init__(self, prefix: str, candidates: list[Any], *, more: bool = False) -> None:
        self.prefix = prefix
        self.candidates = candidates
        listed = ", ".join(f"{c.job_id} ({c.status}, {c.created_at})" for c in candidates)
        super().__init__(
            f"{prefix} is ambiguous: it starts {'more than ' if more else ''}{len(candidates)} job ids: "
            f"{listed}; give more of the id"
        )


class JobFailed(EvalqError):
    def __init__(self, job_id: str, reason: str, info: Any = None) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason
        self.info = info


class JobCancelled(EvalqError):
    def __init__(self, job_id: str, reason: str = "cancelled", info: Any = None) -> None:
        super().__init__(f"job {job_id} was cancelled: {reason}")
        self.job_id = job_id
        self.reason = reason
        self.info = info


class Unconfirmed(EvalqError):
    """Workers running a job did not confirm a lower ack_wait in time: nothing was changed."""
