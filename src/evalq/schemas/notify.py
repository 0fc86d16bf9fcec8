"""The wire types of notifications: a team's webhook subscriptions, a delivery in flight, a
delivery that failed, and the body of the `notify` endpoint (docs/DESIGN.md, "Notifications")."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

from ..fields import Labels
from .wire import Wire

__all__ = [
    "NOTIFY_ON",
    "Delivery",
    "DeliveryFailure",
    "NotifyAdd",
    "NotifyFailures",
    "NotifyList",
    "NotifyOn",
    "NotifyOp",
    "NotifyRemove",
    "NotifyReply",
    "NotifyRetry",
    "Subscription",
    "SubscriptionView",
]

# What triggers a notification: a job's end, its gate's verdict, or a NO-GO verdict only.
NotifyOn = Literal["completed", "failed", "cancelled", "gated", "no-go"]
NOTIFY_ON: tuple[str, ...] = ("completed", "failed", "cancelled", "gated", "no-go")
SubscriptionName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9_\-]+\Z")]
Url = Annotated[str, Meta(min_length=8, max_length=2048, pattern=r"\Ahttps?://[^\s]+\Z")]
Secret = Annotated[str, Meta(min_length=16, max_length=256)]


class SubscriptionView(Wire, frozen=True, kw_only=True):
    """A subscription as its team sees it: everything but the secret."""

    name: str
    url: str
    on: list[str]
    labels: dict[str, str] = {}
    format: Literal["json", "slack"] = "json"


class Subscription(Wire, frozen=True, kw_only=True):
    """A stored subscription (`<prefix>-notify`, key `<team>.<name>`), secret included."""

    name: str
    team: str
    url: str
    on: list[str]
    labels: dict[str, str] = {}
    format: Literal["json", "slack"] = "json"
    secret: str

    def view(self) -> SubscriptionView:
        return SubscriptionView(name=self.name, url=self.url, on=self.on, labels=self.labels, format=self.format)


class Delivery(Wire, frozen=True, kw_only=True):
    """A message of the deliveries stream: one event for one subscription."""

    id: str  # `<job_id>.<event type>`: the receiver's idempotency key
    team: str
    subscription: str
    event: bytes  # the event, as the events stream holds it


class DeliveryFailure(Wire, frozen=True, kw_only=True):
    """A delivery whose attempts ran out (`<prefix>-notify-failures`, key `<team>.<sub>.<id>`)."""

    id: str
    team: str
    subscription: str
    url: str
    attempts: int
    error: str
    at: str
    event: bytes


# --- the `notify` endpoint: a tagged union on "op" ----------------------------------------


class _NotifyBase(Struct, frozen=True, kw_only=True, tag_field="op", forbid_unknown_fields=True):
    pass


class NotifyAdd(_NotifyBase, frozen=True, kw_only=True, tag="add"):
    name: SubscriptionName
    url: Url
    on: Annotated[list[NotifyOn], Meta(min_length=1, max_length=5)] = msgspec.field(
        default_factory=lambda: ["completed", "failed"]
    )
    labels: Labels = {}
    format: Literal["json", "slack"] = "json"
    # The signing secret; one is made when none is given, and answered once.
    secret: Secret | None = None


class NotifyList(_NotifyBase, frozen=True, kw_only=True, tag="list"):
    pass


class NotifyRemove(_NotifyBase, frozen=True, kw_only=True, tag="remove"):
    name: SubscriptionName


class NotifyFailures(_NotifyBase, frozen=True, kw_only=True, tag="failures"):
    pass


class NotifyRetry(_NotifyBase, frozen=True, kw_only=True, tag="retry"):
    """Deliver failed deliveries again: one (`id`, as listed), or all of the team's."""

    id: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


NotifyOp = Union[NotifyAdd, NotifyList, NotifyRemove, NotifyFailures, NotifyRetry]


class NotifyReply(Wire, frozen=True, kw_only=True):
    subscriptions: list[SubscriptionView] = []
    failures: list[DeliveryFailure] = []
    # `add`: the signing secret, answered this once; `retry`: how many went back.
    secret: str | None = None
    retried: int = 0
