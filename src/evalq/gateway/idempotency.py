"""Idempotency keys: a submission's `Idempotency-Key` claims one job id, per team, for the
request it was first used with (the `<prefix>-idempotency` bucket)."""

from __future__ import annotations

import hashlib

import msgspec

from ..errors import BadRequest
from ..schemas import EvaluateRequest

__all__ = ["KeyClaim", "key_digest", "read_claim", "request_fingerprint"]

_KEY_MAX = 256


class KeyClaim(msgspec.Struct, frozen=True, kw_only=True):
    """An Idempotency-Key's entry: the job it names, and the request it was used for."""

    job_id: str
    # sha256 of the request's canonical JSON; None in an entry written before it was stored.
    fingerprint: str | None = None


# Canonical: every field in its declared order, dict keys sorted, so the same request sent
# with its keys in another order is the same request.
_canonical = msgspec.json.Encoder(order="deterministic")


def request_fingerprint(job: EvaluateRequest) -> str:
    return hashlib.sha256(_canonical.encode(job)).hexdigest()


def key_digest(key: str, team: str) -> str:
    """The idempotency bucket's key for an Idempotency-Key: each team's keys are its own, so
    two teams that pick the same key get two jobs, and neither learns of the other's. The
    `default` team's digest is the key's alone, as it was before teams."""
    if not key or len(key) > _KEY_MAX:
        raise BadRequest(f"Idempotency-Key must be 1 to {_KEY_MAX} characters", path="$")
    scoped = key if team == "default" else f"{team}\0{key}"
    return hashlib.sha256(scoped.encode()).hexdigest()


def read_claim(value: bytes) -> KeyClaim:
    """An entry's value: a KeyClaim, or an older gateway's plain job id."""
    if value.startswith(b"{"):
        return msgspec.json.decode(value, type=KeyClaim)
    return KeyClaim(job_id=value.decode())
