"""The messages between the warm evaluator (`warm.py`) and its zygote (`zygote.py`).

One message per SOCK_SEQPACKET datagram, msgpack-encoded; requests and replies are each a
tagged union, so either side refuses what it does not expect instead of guessing from keys.
The zygote imports this before it forks jobs: it stays light (msgspec and evalq's schemas).

Requests, one at a time, each answered in order:

- `Run`, with one file descriptor attached (the job's output pipe): `Started`, then
  `Exited` when the job ends.
- `Spawn`, with one file descriptor attached (the child's control socket): `Started`, at
  once; the child lives on (a resident model, `resident.py`) and the zygote serves the next
  request. Its end is seen on its control socket; the zygote reaps it.
- `Ping`: `About`.
- `TakeInventory`: `InventoryReply`.

Any request may instead be answered with `Failure`. The zygote's first message, unasked,
is `Ready` or `Failure`.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from .inventory import Inventory

__all__ = [
    "MAX_MESSAGE",
    "About",
    "Exited",
    "Failure",
    "InventoryReply",
    "Ping",
    "Ready",
    "Reply",
    "Request",
    "Run",
    "Spawn",
    "Started",
    "TakeInventory",
    "decode_reply",
    "decode_request",
    "encode",
]

# The largest message either side reads (a request carries a job's whole argv).
MAX_MESSAGE = 1 << 20


class Run(msgspec.Struct, frozen=True, kw_only=True, tag="run"):
    """Fork a job running `python -m <module> <argv>` in `cwd`."""

    module: str
    argv: list[str]
    cwd: str


class Spawn(msgspec.Struct, frozen=True, kw_only=True, tag="spawn"):
    """Fork a long-lived child running `python -m <module> <argv>`; `{fd}` in argv becomes the
    number of the attached descriptor in the child. Its output goes to `log_path`."""

    module: str
    argv: list[str]
    cwd: str
    log_path: str


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="ping"):
    pass


class TakeInventory(msgspec.Struct, frozen=True, kw_only=True, tag="inventory"):
    pass


Request: TypeAlias = Run | Spawn | Ping | TakeInventory


class About(msgspec.Struct, frozen=True, kw_only=True, tag="about"):
    """The zygote's view of itself."""

    pid: int
    cuda_initialized: bool
    threads: int
    imported: list[str]


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    warm_s: float
    about: About


class Started(msgspec.Struct, frozen=True, kw_only=True, tag="started"):
    pid: int


class Exited(msgspec.Struct, frozen=True, kw_only=True, tag="exited"):
    """`code` as `subprocess` gives it: negative for the signal that ended the job."""

    pid: int
    code: int


class InventoryReply(msgspec.Struct, frozen=True, kw_only=True, tag="inventory"):
    inventory: Inventory


class Failure(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    error: str


Reply: TypeAlias = Ready | About | Started | Exited | InventoryReply | Failure

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[Request] = msgspec.msgpack.Decoder(Request)
_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)


def encode(message: Request | Reply) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes) -> Request:
    """Raises msgspec.DecodeError (or ValidationError) for anything but a request."""
    return _request_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    """Raises msgspec.DecodeError (or ValidationError) for anything but a reply."""
    return _reply_decoder.decode(data)
