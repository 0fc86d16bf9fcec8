"""Every raw JetStream request evalq makes, and the one place their errors are mapped.

Two kinds live here:

- durable writes: publishes that return once the stream has stored the message (`publish`,
  `Pipeline`, `create_key`). The same request and acknowledgement as nats-py's
  `JetStreamContext.publish`, but the acknowledgement is decoded by msgspec, and a
  `Pipeline` sends several writes before waiting for any, so writes that do not depend on
  each other cost one round trip together, and no task each (`bench/RESULTS.md`, profile);
- reads of the JetStream API (`stream_info`, `consumer_info`, `msg_get_next`,
  `stream_names`): replies decoded by Structs built once, asking only for what evalq reads.

**Where.** API requests go to `Api.prefix`: `$JS.API`, or `$JS.<domain>.API` when the
server's JetStream runs in a domain (`Settings.js_domain`, `api_prefix()`). Key-value
writes go to `$KV.<bucket>.<key>`, which a domain does not change.

**Errors.** `api_error()` is the one mapping from a JetStream error body to an exception.
It returns nats-py's `APIError` subclasses: `BadRequestError` (400), `NotFoundError` (404),
`ServerError` (500), `ServiceUnavailableError` (503), `APIError` for any other code, and
`KeyWrongLastSequenceError` for a failed compare-and-set whatever its code. They stay
nats-py's on purpose: callers here catch the same types around these calls as around
nats-py's own, and each side has one boundary that turns them into evalq's errors (the
gateway's `as_request_error`, the SDK's in `publisher/client.py`). Two more cases:

- nobody answers an API request (`NoRespondersError`): JetStream is not enabled, or not in
  this domain: `ServiceUnavailableError`, as nats-py's own manager raises; on a publish it
  means no stream takes the subject: `NoStreamResponseError`;
- no reply in time: nats-py's `TimeoutError`, unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
    ServerError,
    ServiceUnavailableError,
)

from .errors import EvalqError

__all__ = [
    "DEFAULT_API",
    "Api",
    "ConsumerInfo",
    "ErrorBody",
    "Pipeline",
    "PubAck",
    "Sent",
    "StoredMsg",
    "StreamInfo",
    "StreamState",
    "Write",
    "api_error",
    "api_prefix",
    "checked_chunks",
    "consumer_info",
    "create_key",
    "key_create",
    "key_delete",
    "key_put",
    "kv_stream",
    "kv_subject",
    "msg_get_last",
    "msg_get_next",
    "object_chunks",
    "object_info",
    "object_meta",
    "object_stream",
    "publish",
    "read_object",
    "stream_info",
    "stream_names",
]

DEFAULT_API = "$JS.API"

# The server's codes for "the subject's last sequence is not the one expected".
_WRONG_LAST_SEQUENCE = (10071, 10164)
# "no message found": the end of a scan, not a failure.
_NO_MESSAGE = 10037
_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    404: NotFoundError,
    500: ServerError,
    503: ServiceUnavailableError,
}


# --- errors ---------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, frozen=True):
    """The `error` object of a JetStream API reply or publish acknowledgement."""

    code: int = 0
    err_code: int | None = None
    description: str | None = None


def api_error(body: ErrorBody) -> APIError:
    """The nats-py exception for a JetStream error body, for the caller to raise."""
    if body.err_code in _WRONG_LAST_SEQUENCE:
        conflict = KeyWrongLastSequenceError(description=body.description)
        # Its constructor sets only the description; boundaries read the codes as on any APIError.
        conflict.code, conflict.err_code, conflict.stream, conflict.seq = body.code, body.err_code, None, None
        return conflict
    cls = _BY_STATUS.get(body.code, APIError)
    return cls(code=body.code, err_code=body.err_code, description=body.description)


# --- where API requests go ----------------------------------------------------------------


def api_prefix(domain: str | None = None) -> str:
    """`$JS.API`, or `$JS.<domain>.API` for JetStream in a domain."""
    return f"$JS.{domain}.API" if domain else DEFAULT_API


def kv_stream(bucket: str) -> str:
    """The stream behind a key-value bucket."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """Where a key's values are written and stored."""
    return f"$KV.{bucket}.{key}"


def object_stream(bucket: str) -> str:
    """The stream behind an object store."""
    return f"OBJ_{bucket}"


@dataclass(frozen=True)
class Api:
    """A connection, the API prefix its requests go to, and how long each may take."""

    nc: Client
    prefix: str = DEFAULT_API
    timeout: float = 5.0

    @classmethod
    def of(cls, nc: Client, *, domain: str | None = None, timeout: float = 5.0) -> Api:
        return cls(nc, api_prefix(domain), timeout)

    @classmethod
    def of_context(cls, js: JetStreamContext) -> Api:
        """The connection, prefix (domain included) and timeout a JetStream context was made with."""
        # nats-py keeps these private and has no accessor; this is the one place that reads them.
        return cls(js._nc, js._prefix, js._timeout)


# --- reads ------------------------------------------------------------------------------------


class _Reply(msgspec.Struct):
    """What every API reply may carry instead of its answer."""

    error: ErrorBody | None = None


class StreamState(msgspec.Struct, frozen=True):
    messages: int = 0
    first_seq: int = 0
    last_seq: int = 0
    deleted: list[int] | None = None  # interior gaps, only when asked for with deleted_details


class StreamInfo(_Reply):
    state: StreamState = msgspec.field(default_factory=StreamState)


class ConsumerInfo(_Reply):
    num_ack_pending: int = 0


class StoredMsg(msgspec.Struct, frozen=True):
    subject: str
    seq: int
    data: bytes = b""  # base64 on the wire; msgspec decodes it


class _MsgGetReply(_Reply):
    message: StoredMsg | None = None


class _StreamNamesReply(_Reply):
    total: int = 0
    streams: list[str] | None = None


R = TypeVar("R", bound=_Reply)

_stream_info = msgspec.json.Decoder(StreamInfo)
_consumer_info = msgspec.json.Decoder(ConsumerInfo)
_msg_get = msgspec.json.Decoder(_MsgGetReply)
_stream_names = msgspec.json.Decoder(_StreamNamesReply)
_encode = msgspec.json.Encoder().encode


async def _request(api: Api, path: str, body: bytes, decoder: msgspec.json.Decoder[R]) -> R:
    try:
        msg = await api.nc.request(f"{api.prefix}.{path}", body, timeout=api.timeout)
    except NoRespondersError:
        raise ServiceUnavailableError(
            description=f"no JetStream answers on {api.prefix}: is it enabled, and is the domain right?"
        ) from None
    reply = decoder.decode(msg.data)
    if reply.error is not None:
        raise api_error(reply.error)
    return reply


async def stream_info(api: Api, stream: str, *, deleted_details: bool = False) -> StreamInfo:
    """The stream's state; `deleted_details` lists the sequences deleted from its middle."""
    body = b'{"deleted_details":true}' if deleted_details else b""
    return await _request(api, f"STREAM.INFO.{stream}", body, _stream_info)


async def consumer_info(api: Api, stream: str, consumer: str) -> ConsumerInfo:
    """The consumer's counts; `NotFoundError` if it does not exist."""
    return await _request(api, f"CONSUMER.INFO.{stream}.{consumer}", b"", _consumer_info)


async def msg_get_next(api: Api, stream: str, seq: int, subject: str) -> StoredMsg | None:
    """The first message at or after `seq` whose subject matches `subject`; None past the last."""
    body = _encode({"seq": seq, "next_by_subj": subject})
    try:
        return (await _request(api, f"STREAM.MSG.GET.{stream}", body, _msg_get)).message
    except NotFoundError as exc:
        if exc.err_code == _NO_MESSAGE:
            return None
        raise


async def msg_get_last(api: Api, stream: str, subject: str) -> StoredMsg | None:
    """The last message stored on `subject`; None when there is none."""
    try:
        return (await _request(api, f"STREAM.MSG.GET.{stream}", _encode({"last_by_subj": subject}), _msg_get)).message
    except NotFoundError as exc:
        if exc.err_code == _NO_MESSAGE:
            return None
        raise


async def stream_names(api: Api, *, subject: str | None = None) -> list[str]:
    """Every stream's name (only those holding `subject` when given), all pages."""
    names: list[str] = []
    while True:
        query: dict[str, Any] = {"offset": len(names)}
        if subject is not None:
            query["subject"] = subject
        page = await _request(api, "STREAM.NAMES", _encode(query), _stream_names)
        names += page.streams or []
        if not page.streams or len(names) >= page.total:
            return names


# --- durable writes ---------------------------------------------------------------------


class PubAck(msgspec.Struct, frozen=True):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: ErrorBody | None = None


_ack_decoder = msgspec.json.Decoder(PubAck)


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
    return Write(kv_subject(bucket, key), value, {"Nats-Expected-Last-Subject-Sequence": "0"})


def key_put(bucket: str, key: str, value: bytes, *, ttl: float | None = None) -> Write:
    """A key-value write; with `ttl`, the entry expires by itself (`Nats-TTL`, whole seconds, at least 1)."""
    headers = {"Nats-TTL": f"{max(1, math.ceil(ttl))}s"} if ttl is not None else None
    return Write(kv_subject(bucket, key), value, headers)


def key_delete(bucket: str, key: str, *, ttl: float | None = None) -> Write:
    """A key-value delete marker; with `ttl`, the marker itself expires (the key is gone)."""
    headers = {"KV-Operation": "DEL"}
    if ttl is not None:
        headers["Nats-TTL"] = f"{max(1, math.ceil(ttl))}s"
    return Write(kv_subject(bucket, key), b"", headers)


def _ack_of(msg: Msg) -> PubAck:
    if not msg.data and msg.headers and msg.headers.get("Status") == "503":
        raise NoStreamResponseError
    ack = _ack_decoder.decode(msg.data)
    if ack.error is not None:
        raise api_error(ack.error)
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


# --- object-store reads ---------------------------------------------------------------------
# By sequence with `STREAM.MSG.GET`, never a consumer: the gateway reads results this way for
# submitters, who may make no JetStream request (gateway/reads.py).


async def object_info(api: Api, bucket: str, name: str) -> ObjectInfo | None:
    """The object's stored description; None if it is absent or deleted."""
    found = await object_meta(api, bucket, name)
    return None if found is None else found[0]


async def object_meta(api: Api, bucket: str, name: str) -> tuple[ObjectInfo, bytes] | None:
    """The object's description, parsed and as it is stored; None if it is absent or deleted."""
    meta_subject = f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    meta = await msg_get_last(api, object_stream(bucket), meta_subject)
    if meta is None or not meta.data:
        return None
    info: ObjectInfo = ObjectInfo.from_response(json.loads(meta.data))
    if info.deleted or not info.nuid:
        return None
    return info, meta.data


async def object_chunks(api: Api, bucket: str, name: str, info: ObjectInfo) -> AsyncIterator[bytes]:
    """The object's chunks in order, read by sequence; checked as `checked_chunks` does."""
    stream = object_stream(bucket)
    chunks = f"$O.{bucket}.C.{info.nuid}"

    async def after(seq: int) -> StoredMsg | None:
        return await msg_get_next(api, stream, seq + 1, chunks)

    async for chunk in checked_chunks(bucket, name, info, after):
        yield chunk


async def checked_chunks(
    bucket: str, name: str, info: ObjectInfo, after: Callable[[int], Awaitable[StoredMsg | None]]
) -> AsyncIterator[bytes]:
    """The object's chunks in order, each the first stored after the one before (`after(seq)`);
    the size and digest are checked at the end, so a reader that streams them on learns of a
    torn read by the error, after the last chunk."""
    digest = hashlib.sha256()
    size = 0
    seq = 0
    for _ in range(info.chunks or 0):
        chunk = await after(seq)
        if chunk is None:
            break
        seq = chunk.seq
        digest.update(chunk.data)
        size += len(chunk.data)
        yield chunk.data
    expected = "SHA-256=" + base64.urlsafe_b64encode(digest.digest()).decode()
    if size != (info.size or 0) or (info.digest and info.digest.upper() != expected.upper()):
        raise EvalqError(f"{name} in {bucket} is incomplete or changed while it was read: download it again")


async def read_object(api: Api, bucket: str, name: str) -> bytes | None:
    """An object's bytes, whole and checked; None if it is absent or deleted."""
    info = await object_info(api, bucket, name)
    if info is None:
        return None
    data = bytearray()
    async for chunk in object_chunks(api, bucket, name, info):
        data += chunk
    return bytes(data)
