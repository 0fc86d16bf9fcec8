"""Webhooks: the body a notification carries, its signature, the URLs a subscription may
name, and one POST (docs/DESIGN.md, "Notifications").

A receiver checks `X-Evalq-Signature: sha256=<hex>`, the HMAC-SHA256 of the raw body with
the subscription's secret (`verify`), and drops a repeat by its `Idempotency-Key`
(`<job_id>.<event type>`): delivery is at least once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import urlsplit

from . import http
from .errors import InvalidField
from .schemas import Event, Gated, event_type
from .webguard import is_loopback

__all__ = ["SIGNATURE_HEADER", "check_url", "post", "render", "sign", "verify"]

SIGNATURE_HEADER = "X-Evalq-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """Whether `signature` (the header's value) is `body`'s under `secret`; constant time."""
    return hmac.compare_digest(sign(secret, body).encode(), signature.encode("utf-8", "surrogateescape"))


def check_url(url: str, *, allowed_hosts: list[str], admin: bool) -> None:
    """A subscription's URL: a loopback one anyone may add; another host only an admin, and
    only one of `allowed_hosts` (the gateway's setting). InvalidField at `$.url` otherwise."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError:
        raise InvalidField("Expected an http or https URL with a valid host and port", path="$.url") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidField("Expected an http or https URL with a host", path="$.url")
    if is_loopback(host):
        return
    if not admin:
        raise InvalidField(f"only an admin may add a webhook to {host}, outside loopback", path="$.url")
    if host not in [h.lower() for h in allowed_hosts]:
        raise InvalidField(
            f"{host} is not among the gateway's webhook_hosts ({', '.join(allowed_hosts) or 'none'})", path="$.url"
        )


def render(event: Event, raw: bytes, fmt: str) -> bytes:
    """The body of a notification: the event as stored (`json`), or Slack's `{"text": ...}`."""
    if fmt != "slack":
        return raw
    kind = event_type(event)
    labels = " ".join(f"{k}={v}" for k, v in sorted(event.labels.items()))
    text = f"evalq job {event.job_id} {kind}"
    if isinstance(event, Gated):
        text = f"evalq job {event.job_id}: {event.verdict.verdict} under gate {event.verdict.policy}"
        text += "".join(f"\n- {r.metric}: {r.status} ({r.reason})" for r in event.verdict.rules)
    body: dict[str, Any] = {"text": f"{text}{f' ({labels})' if labels else ''}"}
    return json.dumps(body).encode()


async def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float) -> int:
    """POST a notification; the response's status code (http.py)."""
    return await http.request("POST", url, body, {"Content-Type": "application/json", **headers}, timeout=timeout)
