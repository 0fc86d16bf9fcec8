"""The `read` endpoint: stored events and result objects, read through the gateway.

A submitter reads nothing of the queue's JetStream objects directly: a direct get names its
subject in the request's body, where no permission can look, so one team could read
another's. The gateway reads for it, within the requester's team (docs/DESIGN.md,
"Permissions").
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from ..fields import JOB_ID
from .wire import Wire

__all__ = [
    "READ_EVENTS_MAX",
    "Chunk",
    "ChunkReply",
    "EventsPage",
    "ObjectReply",
    "ReadChunk",
    "ReadEvents",
    "ReadLast",
    "ReadObject",
    "ReadOp",
    "StoredEvent",
    "decode_read_op",
]

# How many events one `events` read returns at most; a page also stops near 512 KiB.
READ_EVENTS_MAX = 1000

# One subject token, or `*` for any: a job id, an event's type.
Token = Annotated[str, Meta(pattern=r"\A(\*|[A-Za-z0-9_\-]{1,64})\Z")]
# A result object's name: its job's id, then its path in the job's folder.
ObjectName = Annotated[str, Meta(pattern=rf"\A{JOB_ID.pattern}/.", max_length=1024)]


class _ReadBase(Struct, frozen=True, kw_only=True, tag_field="op", forbid_unknown_fields=True):
    pass


class ReadEvents(_ReadBase, frozen=True, kw_only=True, tag="events"):
    """Stored events after the sequence `after`, in the stream's order; with `last`, only the
    last one matching. A job id names one job the requester may see (404 otherwise); `*`
    reads every job of the requester's team (every team's for an admin)."""

    job_id: Token = "*"
    kind: Token = "*"
    after: Annotated[int, Meta(ge=0)] = 0
    limit: Annotated[int, Meta(ge=1, le=READ_EVENTS_MAX)] = 256
    last: bool = False


class ReadLast(_ReadBase, frozen=True, kw_only=True, tag="last"):
    """The events stream's last sequence: where a follower without history starts."""


class ReadObject(_ReadBase, frozen=True, kw_only=True, tag="object"):
    """A result object's description (`<job_id>/<path>`): its size, chunks and digest."""

    name: ObjectName


class ReadChunk(_ReadBase, frozen=True, kw_only=True, tag="chunk"):
    """The object's chunks stored after the sequence `after`, the next few; `nuid` (from its
    description) names the version of the object being read, so a gateway that kept an older
    description reads it again."""

    name: ObjectName
    after: Annotated[int, Meta(ge=0)] = 0
    nuid: Annotated[str, Meta(max_length=64)] | None = None


ReadOp = Union[ReadEvents, ReadLast, ReadObject, ReadChunk]


class StoredEvent(Wire, frozen=True, kw_only=True):
    seq: int
    # The event as it is stored (an `Event`'s JSON), passed on unparsed.
    event: msgspec.Raw


class EventsPage(Wire, frozen=True, kw_only=True):
    events: list[StoredEvent] = []
    # Whether more events matched than this page holds: read again after the last one.
    more: bool = False
    # The stream's last sequence (`last`): nothing stored so far is after it.
    last_seq: int = 0


class ObjectReply(Wire, frozen=True, kw_only=True):
    # The object store's own description of the object (name, size, chunks, digest, nuid),
    # or null when there is no such object.
    info: dict[str, Any] | None = None


class Chunk(Wire, frozen=True, kw_only=True):
    seq: int
    data: bytes


class ChunkReply(Wire, frozen=True, kw_only=True):
    # The object's next chunks in order, as many as fit in about 512 KiB; none past its last.
    chunks: list[Chunk] = []


_read_op: msgspec.json.Decoder[ReadOp] = msgspec.json.Decoder(ReadOp)  # type: ignore[arg-type]


def decode_read_op(data: bytes | str) -> ReadOp:
    return _read_op.decode(data)
