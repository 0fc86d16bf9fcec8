"""Reading what the queue stored, through the gateway's `read` endpoint: a job's events, in
the stream's order, and its result objects, chunk by chunk, each checked whole.

A submitter has no direct read of the queue's streams: a direct get names its subject in
its body, where nats-server's permissions cannot look, so the gateway reads for it within
its team (docs/DESIGN.md, "Permissions"). What comes live, the events' core messages, only
says when to read again (`Doorbell`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ObjectInfo

from .. import jetstream
from ..schemas import ChunkReply, EventsPage, ObjectReply, ReadChunk, ReadEvents, ReadLast, ReadObject, encode

__all__ = ["Doorbell", "Reads"]

T = TypeVar("T")


class Reads:
    """The client's reads; `ask(endpoint, reply type, body)` is its request to the gateway."""

    def __init__(self, ask: Callable[..., Awaitable[object]], bucket: str) -> None:
        self._ask = ask
        self.bucket = bucket

    async def _read(self, op: object, reply: type[T]) -> T:
        answer = await self._ask("read", reply, encode(op))
        assert isinstance(answer, reply)
        return answer

    async def events(
        self, *, job_id: str = "*", kind: str = "*", after: int = 0, limit: int = 256, last: bool = False
    ) -> EventsPage:
        """Stored events after the sequence `after` (the last one matching, with `last`)."""
        op = ReadEvents(job_id=job_id, kind=kind, after=after, limit=limit, last=last)
        return await self._read(op, EventsPage)

    async def last_seq(self) -> int:
        return (await self._read(ReadLast(), EventsPage)).last_seq

    async def object_info(self, name: str) -> ObjectInfo | None:
        reply = await self._read(ReadObject(name=name), ObjectReply)
        if reply.info is None:
            return None
        info: ObjectInfo = ObjectInfo.from_response(reply.info)
        return info

    async def chunks(self, name: str, info: ObjectInfo) -> AsyncIterator[bytes]:
        total = info.chunks or 0
        fetched: list[jetstream.StoredMsg] = []
        ahead: asyncio.Future[ChunkReply] | None = None
        got = 0

        def ask(seq: int) -> asyncio.Future[ChunkReply]:
            return asyncio.ensure_future(self._read(ReadChunk(name=name, after=seq, nuid=info.nuid), ChunkReply))

        async def after(seq: int) -> jetstream.StoredMsg | None:
            nonlocal ahead, got
            if not fetched:
                reply = await (ahead if ahead is not None else ask(seq))
                ahead = None
                fetched.extend(jetstream.StoredMsg(subject="", seq=c.seq, data=c.data) for c in reply.chunks)
                got += len(reply.chunks)
                if reply.chunks and got < total:
                    # The next chunks are on their way while these are used.
                    ahead = ask(reply.chunks[-1].seq)
            return fetched.pop(0) if fetched else None

        try:
            async for data in jetstream.checked_chunks(self.bucket, name, info, after):
                yield data
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead

    async def read_object(self, name: str) -> bytes | None:
        """An object's bytes, whole and checked; None if there is no such object."""
        info = await self.object_info(name)
        if info is None:
            return None
        data = bytearray()
        async for chunk in self.chunks(name, info):
            data += chunk
        return bytes(data)


class Doorbell:
    """Says when a follower should read the events again.

    A core subscriber may see a message a moment before the stream has stored it, so a
    message seen live stays pending until a read finds it stored, and until then the
    follower reads again after a short, growing pause. One the stream never stores (a
    duplicate it dropped) is forgotten after `patience` seconds.
    """

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.pending: dict[bytes, float] = {}
        self.rung = asyncio.Event()
        self.pause = _FIRST_PAUSE

    async def ring(self, msg: Msg) -> None:
        self.pending.setdefault(msg.data, time.monotonic() + self.patience)
        self.rung.set()

    def clear(self) -> None:
        self.rung.clear()

    def stored(self, data: bytes) -> None:
        self.pending.pop(data, None)

    async def wait(self, nc: NatsClient) -> None:
        """Until there may be something new to read."""
        reconnects = nc.stats["reconnects"]
        while True:
            now = time.monotonic()
            self.pending = {data: until for data, until in self.pending.items() if until > now}
            if not self.pending:
                self.pause = _FIRST_PAUSE
            try:
                await asyncio.wait_for(self.rung.wait(), self.pause if self.pending else _RECONNECT_CHECK)
                return
            except TimeoutError:
                if self.pending:
                    self.pause = min(self.pause * 2, 0.5)
                    return
                if nc.stats["reconnects"] != reconnects:
                    return  # events published while the connection was down rang no bell


_FIRST_PAUSE = 0.005
_RECONNECT_CHECK = 1.0
