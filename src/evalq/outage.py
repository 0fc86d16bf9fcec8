"""NATS outages: the errors that mean "away for now", and waiting one out.

A server restart or a leader election makes requests time out or find no responders for
a few seconds. A worker that holds an evaluation's result waits that out rather than lose
hours of GPU time; a gateway answers 503 and lets the client retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import ConnectionClosedError, NoRespondersError, OutboundBufferLimitError, StaleConnectionError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

__all__ = ["OUTAGE", "outlast"]

log = logging.getLogger("evalq")

OUTAGE: tuple[type[BaseException], ...] = (
    NatsTimeout,
    asyncio.TimeoutError,
    NoRespondersError,
    ServiceUnavailableError,
    NoStreamResponseError,  # a publish that met no stream leader (a node is down)
    ConnectionClosedError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
T = TypeVar("T")


async def outlast(step: Callable[[], Awaitable[T]], what: str, timeout: float) -> T:
    """Run `step`, retrying through an outage for up to `timeout` seconds; other errors are raised."""
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return await step()
        except OUTAGE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: NATS unavailable (%s); retrying", what, type(exc).__name__)
            await asyncio.sleep(delay)  # back-off while the client reconnects
            delay = min(delay * 2, 5.0)
