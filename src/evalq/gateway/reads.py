"""The `read` endpoint: a submitter's reads of stored events and results, within its team.

A direct get (`STREAM.MSG.GET`) names the subject it reads in its body, where no permission
can look, so none is exported to submitters: the gateway reads for them. An events read is
bounded by the team's token in the subject (`<prefix>.events.<team>.>`), or by the job's
record when it names one; a result object's first path segment is its job, whose record
names the team. Another team's job is answered as no job at all (404), as `status` does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import msgspec
from nats.js.api import ObjectInfo
from nats.micro.request import Request

from .. import jetstream
from ..errors import JobNotFound
from ..jobstore import JobStore
from ..schemas import (
    Chunk,
    ChunkReply,
    EventsPage,
    ObjectReply,
    ReadChunk,
    ReadEvents,
    ReadLast,
    ReadObject,
    StoredEvent,
    decode_read_op,
)
from ..topology import Topology
from .identity import Requester, of_request

__all__ = ["Reads"]

# A page of events holds at most this much (or one event), so a reply stays under a server's 1 MiB.
_PAGE_BYTES = 512 * 1024
# A reply of chunks stops once it holds this much (the object store's chunks are 128 KiB:
# three of them, base64 in JSON, stay well under a server's 1 MiB).
_CHUNKS_BYTES = 384 * 1024
# How long an object's description is kept between its chunk reads, and how many are.
_OBJECT_TTL = 30.0
_OBJECTS_KEPT = 256


class Reads:
    def __init__(self, api: jetstream.Api, topology: Topology, jobs: JobStore) -> None:
        self.api = api
        self.topology = topology
        self.jobs = jobs
        # name -> (description, when read): a download reads the description once, not per chunk.
        self._objects: dict[str, _Kept] = {}

    async def serve(self, request: Request) -> EventsPage | ObjectReply | ChunkReply:
        op = decode_read_op(request.data or b"{}")
        who = of_request(request)
        if isinstance(op, ReadEvents):
            return await self._events(op, who)
        if isinstance(op, ReadLast):
            events = await jetstream.stream_info(self.api, self.topology.events_stream)
            return EventsPage(last_seq=events.state.last_seq)
        if isinstance(op, ReadObject):
            found = await self._object(op.name, who, cached=False)
            return ObjectReply(info=None if found is None else json.loads(found[1]))
        assert isinstance(op, ReadChunk)
        found = await self._object(op.name, who, cached=True, nuid=op.nuid)
        if found is None:
            return ChunkReply()
        subject = f"$O.{self.topology.results_bucket}.C.{found[0].nuid}"
        stream = jetstream.object_stream(self.topology.results_bucket)
        chunks: list[Chunk] = []
        size, seq, left = 0, op.after, found[0].chunks or 0
        # Several a reply: a download takes a round trip per half MiB, not per chunk.
        while size < _CHUNKS_BYTES and len(chunks) < left:
            chunk = await jetstream.msg_get_next(self.api, stream, seq + 1, subject)
            if chunk is None:
                break
            seq = chunk.seq
            size += len(chunk.data)
            chunks.append(Chunk(seq=chunk.seq, data=chunk.data))
        return ChunkReply(chunks=chunks)

    async def _team_of(self, job_id: str, who: Requester) -> str:
        """The team of a job the requester may see; 404 for any other. An admin may read what
        is stored for an id with no record (`*`: any team's), a team may not: to it, another
        team's job and no job look the same."""
        found = await self.jobs.get(job_id)
        if found is None and who.admin:
            return "*"
        if found is None or not who.may_see(found[0].team):
            raise JobNotFound(f"no job {job_id}", path="$.job_id")
        return found[0].team

    async def _events(self, op: ReadEvents, who: Requester) -> EventsPage:
        if op.job_id != "*":
            team = await self._team_of(op.job_id, who)
        else:
            team = "*" if who.admin else who.team
        subject = self.topology.events_filter(op.job_id, op.kind, team=team)
        stream = self.topology.events_stream
        if op.last:
            found = await jetstream.msg_get_last(self.api, stream, subject)
            events = [] if found is None else [StoredEvent(seq=found.seq, event=msgspec.Raw(found.data))]
            return EventsPage(events=events)
        events, size, seq = [], 0, op.after
        while len(events) < op.limit:
            found = await jetstream.msg_get_next(self.api, stream, seq + 1, subject)
            if found is None:
                return EventsPage(events=events)
            if events and size + len(found.data) > _PAGE_BYTES:
                break  # the next page starts with it: a reply never outgrows the server's limit
            seq = found.seq
            size += len(found.data)
            events.append(StoredEvent(seq=found.seq, event=msgspec.Raw(found.data)))
        return EventsPage(events=events, more=True)

    async def _object(
        self, name: str, who: Requester, *, cached: bool, nuid: str | None = None
    ) -> tuple[ObjectInfo, bytes] | None:
        kept = self._objects.get(name)
        if cached and kept is not None and time.monotonic() - kept.at < _OBJECT_TTL and nuid in (None, kept.nuid):
            # A job's team never changes: the check made when it was kept still holds.
            if kept.team != "*" and not who.may_see(kept.team):
                raise JobNotFound(f"no job {name.split('/', 1)[0]}", path="$.job_id")
            if kept.team != "*" or who.admin:
                return kept.found
        team = await self._team_of(name.split("/", 1)[0], who)
        found = await jetstream.object_meta(self.api, self.topology.results_bucket, name)
        if found is not None:
            if len(self._objects) >= _OBJECTS_KEPT:
                self._objects.pop(next(iter(self._objects)))
            self._objects[name] = _Kept(found=found, nuid=found[0].nuid, team=team, at=time.monotonic())
        return found


@dataclass(frozen=True)
class _Kept:
    """An object's description as a download's chunk reads use it, and its job's team (`*`:
    read for an admin under an id with no record)."""

    found: tuple[ObjectInfo, bytes]
    nuid: str | None
    team: str
    at: float
