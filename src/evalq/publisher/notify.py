"""`client.notify`: a team's webhook subscriptions, and the deliveries that failed.

reply = await client.notify.add("ci", "http://127.0.0.1:9000/hook", on=["completed", "no-go"])
secret = reply.secret   # answered this once: keep it to check the X-Evalq-Signature header
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..schemas import DeliveryFailure, NotifyReply, SubscriptionView, encode

__all__ = ["Notify"]

T = TypeVar("T")
Ask = Callable[[str, type[T], bytes], Awaitable[T]]


class Notify:
    def __init__(self, ask: Ask[Any]) -> None:
        self._ask = ask

    async def _op(self, **body: Any) -> NotifyReply:
        reply: NotifyReply = await self._ask("notify", NotifyReply, encode(body))
        return reply

    async def add(
        self,
        name: str,
        url: str,
        *,
        on: list[str] | None = None,
        labels: dict[str, str] | None = None,
        format: str = "json",
        secret: str | None = None,
    ) -> NotifyReply:
        """Add (or replace) the team's subscription `name`: POST the events `on` names
        (`completed`, `failed`, `cancelled`, `gated`, `no-go`; default the first two) of the
        team's jobs whose labels include `labels` to `url`. The reply's `secret` signs them."""
        body: dict[str, Any] = {"op": "add", "name": name, "url": url, "labels": labels or {}, "format": format}
        if on is not None:
            body["on"] = on
        if secret is not None:
            body["secret"] = secret
        return await self._op(**body)

    async def subscriptions(self) -> list[SubscriptionView]:
        """The team's subscriptions (their secrets are never answered again)."""
        return (await self._op(op="list")).subscriptions

    async def remove(self, name: str) -> list[SubscriptionView]:
        """Remove a subscription; the ones left."""
        return (await self._op(op="remove", name=name)).subscriptions

    async def failures(self) -> list[DeliveryFailure]:
        """Deliveries whose tries ran out, oldest first."""
        return (await self._op(op="failures")).failures

    async def retry(self, delivery_id: str | None = None) -> int:
        """Deliver failed deliveries again (one by its id, else all); how many went back."""
        body: dict[str, Any] = {"op": "retry"}
        if delivery_id is not None:
            body["id"] = delivery_id
        return (await self._op(**body)).retried
