"""Durable writes: a JetStream publish that returns once the stream has stored the message.

The same request and acknowledgement as nats-py's `JetStreamContext.publish`, and the same
errors, with the acknowledgement decoded by msgspec. A submission makes three or four of
these writes, and generic JSON decoding of each acknowledgement was a measurable share of
the gateway's CPU (`bench/RESULTS.md`, the profile section).
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js.errors import APIError, KeyWrongLastSequenceError, NoStreamResponseError

__all__ = ["PubAck", "create_key", "publish"]


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class PubAck(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(PubAck)
# The server's codes for "the subject's last sequence is not the one expected".
_WRONG_LAST_SEQUENCE = (10071, 10164)


async def publish(
    nc: Client,
    subject: str,
    payload: bytes,
    *,
    timeout: float,
    stream: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> PubAck:
    """Publish and wait for the stream's acknowledgement; raises nats-py's JetStream errors."""
    sent = dict(headers) if headers else {}
    if stream is not None:
        sent["Nats-Expected-Stream"] = stream
    try:
        msg = await nc.request(subject, payload, timeout=timeout, headers=sent or None)
    except NoRespondersError:
        raise NoStreamResponseError from None
    ack = _ack_decoder.decode(msg.data)
    if ack.error is not None:
        APIError.from_error(msgspec.structs.asdict(ack.error))  # raises the matching subclass
    return ack


async def create_key(nc: Client, bucket: str, key: str, value: bytes, *, timeout: float) -> int:
    """Write a key that has never been written; `KeyWrongLastSequenceError` if it has."""
    try:
        ack = await publish(
            nc, f"$KV.{bucket}.{key}", value, timeout=timeout, headers={"Nats-Expected-Last-Subject-Sequence": "0"}
        )
    except APIError as err:
        if err.err_code in _WRONG_LAST_SEQUENCE:
            raise KeyWrongLastSequenceError(description=err.description) from None
        raise
    return ack.seq
