"""Where an exception becomes the gateway's error reply: the one place for codes.

Every endpoint's handler returns a reply or raises; `as_request_error` maps what it raised
(evalq's own errors, msgspec's, nats-py's JetStream errors) to the `RequestError` whose code
and message the requester gets.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ..errors import BadRequest, Conflict, InvalidField, RequestError, Unavailable, WrongState
from ..schemas import error_path

__all__ = ["FULL_CODES", "as_request_error"]

log = logging.getLogger("evalq.gateway")

# JetStream error codes that mean "the queue cannot take more", not "the gateway broke".
FULL_CODES = {
    10077: "the queue is full",
    10027: "the queue is full",
    10047: "the server is out of storage",
    10023: "the server is out of storage",
}
# Errors that mean "JetStream could not answer now" (a node down, an election): a retry helps.
_UNAVAILABLE = (NatsTimeout, NoRespondersError, asyncio.TimeoutError, ServiceUnavailableError, NoStreamResponseError)


def as_request_error(exc: BaseException) -> RequestError:
    """Map any exception to the error reply it deserves; the one boundary for codes."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        message, path = error_path(exc)
        return InvalidField(message, path=path)
    if isinstance(exc, msgspec.DecodeError):
        message, path = error_path(exc)
        return BadRequest(message, path=path)
    if isinstance(exc, Conflict):
        # Others kept changing the record first: the request may succeed if sent again.
        return WrongState(f"{exc or 'the job changed while this request ran'}; retry")
    if isinstance(exc, APIError):
        # getattr: nats-py's key-value errors never set their codes.
        full = FULL_CODES.get(getattr(exc, "err_code", None) or 0)
        if full is not None:
            return Unavailable(f"{full} ({exc.description}); retry later")
    if isinstance(exc, NotFoundError):
        # A stream or consumer the answer needs is gone (deleted, or a pool still being
        # created): answering without it would be wrong, and it may be back on a retry.
        log.warning("a JetStream object is missing: %s", exc)
        return Unavailable(f"{exc}; retry once the queue's objects exist again (a worker or gateway creates them)")
    if isinstance(exc, _UNAVAILABLE):
        return Unavailable("JetStream did not answer in time; retry with the same Idempotency-Key")
    log.error("internal error", exc_info=exc)
    return RequestError("internal error; see the gateway's log", code=500)
