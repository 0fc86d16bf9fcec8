"""Durable writes: JetStream publishes that return once the stream has stored the message.

The same request and acknowledgement as nats-py's `JetStreamContext.publish`, and the same
errors, with two differences that matter on the submit path (`bench/RESULTS.md`, profile):

- the acknowledgement is decoded by msgspec;
- a `Pipeline` sends several writes before waiting for any acknowledgement, so writes that
  do not depend on each other cost one round trip together, and no task each.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, KeyWrongLastSequenceError, NoStreamResponseError

__all__ = ["Pipeline", "PubAck", "Sent", "Write", "create_key", "key_create", "publish"]


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


@dataclass(frozen=True)
class Write:
    """One message for a stream, with the headers that make the stream check it.

    `stream`, when given, is the stream that must store it (`Nats-Expected-Stream`).
    """

    subject: str
    payload: bytes
    headers: Mapping[str, str] | None = None
    stream: str | None = None

    def sent_headers(self) -> dict[str, str] | None:
        sent = dict(self.headers) if self.headers else {}
        if self.stream is not None:
            sent["Nats-Expected-Stream"] = self.stream
        return sent or None


def key_create(bucket: str, key: str, value: bytes) -> Write:
    """A key-value write that the stream refuses if the key was ever written."""
    return Write(f"$KV.{bucket}.{key}", value, {"Nats-Expected-Last-Subject-Sequence": "0"})


def _ack_of(msg: Msg) -> PubAck:
    if not msg.data and msg.headers and msg.headers.get("Status") == "503":
        raise NoStreamResponseError
    ack = _ack_decoder.decode(msg.data)
    if ack.error is not None:
        try:
            APIError.from_error(msgspec.structs.asdict(ack.error))  # raises the matching subclass
        except APIError as err:
            if err.err_code in _WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=err.description) from None
            raise
    return ack


async def publish(nc: Client, write: Write, *, timeout: float) -> PubAck:
    """Publish and wait for the stream's acknowledgement; raises nats-py's JetStream errors."""
    try:
        msg = await nc.request(write.subject, write.payload, timeout=timeout, headers=write.sent_headers())
    except NoRespondersError:
        raise NoStreamResponseError from None
    return _ack_of(msg)


async def create_key(nc: Client, bucket: str, key: str, value: bytes, *, timeout: float) -> int:
    """Write a key that has never been written; `KeyWrongLastSequenceError` if it has."""
    return (await publish(nc, key_create(bucket, key, value), timeout=timeout)).seq


@dataclass(frozen=True)
class Sent:
    token: str
    ack: asyncio.Future[Msg]


class Pipeline:
    """Writes on one connection whose acknowledgements come back to one inbox.

    `send()` publishes and returns at once; `wait()` collects the acknowledgements.
    """

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._inbox: str | None = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count()

    async def _open(self) -> str:
        if self._inbox is None:
            inbox = self.nc.new_inbox()
            await self.nc.subscribe(f"{inbox}.*", cb=self._on_ack)
            self._inbox = inbox
        return self._inbox

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def send(self, write: Write) -> Sent:
        inbox = await self._open()
        token = str(next(self._tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self.nc.publish(write.subject, write.payload, reply=f"{inbox}.{token}", headers=write.sent_headers())
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return Sent(token, future)

    async def wait(self, sent: Sequence[Sent], *, timeout: float) -> list[PubAck | BaseException]:
        """Each write's acknowledgement, or the error it met (a timeout included), in order."""
        if sent:
            await asyncio.wait([s.ack for s in sent], timeout=timeout)
        outcomes: list[PubAck | BaseException] = []
        for each in sent:
            if not each.ack.done():
                self._waiting.pop(each.token, None)
                each.ack.cancel()
                outcomes.append(NatsTimeout())
                continue
            try:
                outcomes.append(_ack_of(each.ack.result()))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes
