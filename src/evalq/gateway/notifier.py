"""The notifier: webhooks for a team's jobs, delivered at least once, and the `notify` endpoint.

Two durable consumers, shared by every gateway, so that what one gateway leaves undone
another (or its own restart) does:
1. **Fan-out.** `<prefix>-notify` on the events stream (terminal and `gated` events) turns
   each event into one `Delivery` per matching subscription of the job's team, published to
   the deliveries stream (`Nats-Msg-Id: <subscription>.<delivery id>`: one each), and acks it.
2. **Delivery.** `<prefix>-deliver` on the deliveries stream POSTs each one, signed, many at
   once so that one slow receiver holds up no other. A 2xx acks it. Anything else, or no
   answer within `notify_timeout`, hands it back after a growing delay; after
   `notify_attempts` tries it is kept in the failures bucket (`evalq notify failures`) for a
   retry by hand. Nothing here is on a job's path: a dead receiver delays no job.
docs/DESIGN.md, "Notifications".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from nats.micro.request import Request

from .. import jetstream
from ..config import GatewaySettings
from ..errors import InvalidField
from ..jobstore import JobStore
from ..schemas import (
    Delivery,
    DeliveryFailure,
    Event,
    Gated,
    NotifyAdd,
    NotifyFailures,
    NotifyList,
    NotifyRemove,
    NotifyReply,
    NotifyRetry,
    Subscription,
    decode,
    decode_event,
    decode_notify_op,
    encode,
    event_type,
    now,
)
from ..topology import Topology
from ..webhooks import SIGNATURE_HEADER, check_url, post, render, sign
from .identity import of_request

__all__ = ["BACKOFF", "Notifier", "matches"]

log = logging.getLogger("evalq.gateway")

# Seconds before the next try of a delivery, by tries so far (the last one repeats).
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_CONCURRENT = 32  # deliveries under way at once
_FETCH_S = 1.0  # the longest a fetch waits for messages


def matches(subscription: Subscription, event: Event) -> bool:
    """Whether `event` (of one of the subscription's team's jobs) is one it asked for."""
    kind = event_type(event)
    wanted = kind in subscription.on or (
        isinstance(event, Gated) and "no-go" in subscription.on and event.verdict.verdict == "NO-GO"
    )
    return wanted and all(event.labels.get(k) == v for k, v in subscription.labels.items())


class Notifier:
    """Runs both loops while its gateway serves (`start`, `stop`); serves `notify`."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        topology: Topology,
        *,
        jobs: JobStore,
        settings: GatewaySettings,
        timeout: float,
    ) -> None:
        self.nc = nc
        self.js = js
        self.topology = topology
        self.jobs = jobs
        self.settings = settings
        self.timeout = timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._slots = asyncio.Semaphore(_CONCURRENT)
        self._held: dict[int, Msg] = {}  # by id(): a Msg is not hashable
        self._stopping = False

    async def start(self) -> Notifier:
        self.subs: KeyValue = await self.js.key_value(self.topology.notify_bucket)
        self.failures: KeyValue = await self.js.key_value(self.topology.notify_failures_bucket)
        self.events = await self.js.pull_subscribe_bind(self.topology.notify_consumer, self.topology.events_stream)
        self.deliveries = await self.js.pull_subscribe_bind(
            self.topology.deliver_consumer, self.topology.deliveries_stream
        )
        self._tasks = [
            asyncio.create_task(self._loop(self._fan_out_some), name="notify-fan-out"),
            asyncio.create_task(self._loop(self._deliver_some), name="notify-deliver"),
        ]
        return self

    async def stop(self) -> None:
        self._stopping = True
        # Each loop ends after the fetch under way (at most `_FETCH_S`). Cancelled during
        # one, the messages the server was sending it would be taken with nobody to settle
        # them, and wait out the consumer's ack_wait (2 min for deliveries) before the next
        # gateway got them.
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=_FETCH_S + 2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        # Handed back at once: the next gateway (or this one, restarted) delivers them.
        for msg in list(self._held.values()):
            with contextlib.suppress(Exception):
                await msg.nak()
        for sub in (getattr(self, "events", None), getattr(self, "deliveries", None)):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _loop(self, step: Callable[[], Awaitable[None]]) -> None:
        while not self._stopping:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # an outage: the next fetch tries again
                log.warning("notifier: %s", exc)
                await asyncio.sleep(1.0)

    # --- subscriptions -----------------------------------------------------------------

    async def _subscriptions(self, team: str) -> list[Subscription]:
        found = []
        with contextlib.suppress(NoKeysError):
            for key in await self.subs.keys():
                if key.partition(".")[0] != team:
                    continue
                with contextlib.suppress(KeyNotFoundError):
                    entry = await self.subs.get(key)
                    if entry.value:
                        found.append(decode(entry.value, Subscription))
        return sorted(found, key=lambda s: s.name)

    async def _subscription(self, team: str, name: str) -> Subscription | None:
        try:
            entry = await self.subs.get(f"{team}.{name}")
        except KeyNotFoundError:
            return None
        return decode(entry.value, Subscription) if entry.value else None

    # --- fan-out -----------------------------------------------------------------------

    async def _fan_out_some(self) -> None:
        for msg in await self.events.fetch(16, timeout=_FETCH_S):
            try:
                await self._fan_out(msg)
            except Exception as exc:
                log.warning("notifier: an event's deliveries could not be queued (%s); tried again", exc)
                await msg.nak(delay=1.0)
                continue
            await msg.ack()

    async def _fan_out(self, msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except Exception:
            return  # not an event this version reads: nothing to announce
        found = await self.jobs.get(event.job_id)
        if found is None:
            return
        team = found[0].team
        kind = event_type(event)
        for subscription in await self._subscriptions(team):
            if not matches(subscription, event):
                continue
            delivery = Delivery(id=f"{event.job_id}.{kind}", team=team, subscription=subscription.name, event=msg.data)
            await self._queue(delivery, f"{subscription.name}.{delivery.id}")

    async def _queue(self, delivery: Delivery, msg_id: str) -> None:
        write = jetstream.Write(
            self.topology.delivery_subject(delivery.team, delivery.subscription),
            encode(delivery),
            {"Nats-Msg-Id": msg_id},
            stream=self.topology.deliveries_stream,
        )
        await jetstream.publish(self.nc, write, timeout=self.timeout)

    # --- delivery ----------------------------------------------------------------------

    async def _deliver_some(self) -> None:
        await self._slots.acquire()  # one free slot before asking for more
        self._slots.release()
        msgs = await self.deliveries.fetch(8, timeout=_FETCH_S)
        for msg in msgs:  # held at once: a stop while they wait for a slot hands them back
            self._held[id(msg)] = msg
        for msg in msgs:
            await self._slots.acquire()
            task = asyncio.create_task(self._deliver(msg))
            task.add_done_callback(functools.partial(self._done, msg))

    def _done(self, msg: Msg, _: asyncio.Task[None]) -> None:
        self._held.pop(id(msg), None)
        self._slots.release()

    async def _deliver(self, msg: Msg) -> None:
        try:
            await self._attempt(msg)
        except Exception as exc:  # an outage while settling it: handed back, to be tried again
            log.warning("notifier: a delivery could not be settled (%s); tried again", exc)
            with contextlib.suppress(Exception):
                await msg.nak(delay=BACKOFF[0])

    async def _attempt(self, msg: Msg) -> None:
        try:
            delivery = decode(msg.data, Delivery)
        except Exception:
            await msg.term()
            return
        subscription = await self._subscription(delivery.team, delivery.subscription)
        if subscription is None:
            await msg.ack()  # removed since: nobody to tell
            return
        event = decode_event(delivery.event)
        body = render(event, delivery.event, subscription.format)
        headers = {
            "Idempotency-Key": delivery.id,
            "X-Evalq-Event": delivery.id.rsplit(".", 1)[-1],
            "X-Evalq-Subscription": subscription.name,
            SIGNATURE_HEADER: sign(subscription.secret, body),
        }
        try:
            status = await post(subscription.url, body, headers, timeout=self.settings.notify_timeout)
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except Exception as exc:  # any failure is a failed try, counted: none may stall the consumer
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if error is None:
            await msg.ack()
            return
        tries = msg.metadata.num_delivered or 1
        if tries < self.settings.notify_attempts:
            await msg.nak(delay=BACKOFF[min(tries, len(BACKOFF)) - 1])
            return
        failure = DeliveryFailure(
            id=delivery.id,
            team=delivery.team,
            subscription=delivery.subscription,
            url=subscription.url,
            attempts=tries,
            error=error,
            at=now(),
            event=delivery.event,
        )
        await self.failures.put(f"{delivery.team}.{delivery.subscription}.{delivery.id}", encode(failure))
        await msg.term()
        log.warning("webhook %s: %s undelivered after %d tries (%s)", subscription.name, delivery.id, tries, error)

    # --- the endpoint ------------------------------------------------------------------

    async def serve(self, request: Request) -> NotifyReply:
        op = decode_notify_op(request.data or b"{}")
        who = of_request(request)
        team = who.team
        if isinstance(op, NotifyAdd):
            check_url(op.url, allowed_hosts=self.settings.webhook_hosts, admin=who.admin)
            secret = op.secret or secrets.token_urlsafe(32)
            stored = Subscription(
                name=op.name,
                team=team,
                url=op.url,
                on=list(op.on),
                labels=op.labels,
                format=op.format,
                secret=secret,
            )
            await self.subs.put(f"{team}.{op.name}", encode(stored))
            return NotifyReply(subscriptions=[stored.view()], secret=secret)
        if isinstance(op, NotifyRemove):
            if await self._subscription(team, op.name) is None:
                raise InvalidField(f"no subscription named {op.name!r}", path="$.name")
            await self.subs.delete(f"{team}.{op.name}")
        if isinstance(op, (NotifyList, NotifyRemove)):
            return NotifyReply(subscriptions=[s.view() for s in await self._subscriptions(team)])
        failed = await self._failures(team)
        if isinstance(op, NotifyFailures):
            return NotifyReply(failures=[f for _, f in failed])
        assert isinstance(op, NotifyRetry)
        chosen = [(key, f) for key, f in failed if op.id is None or f.id == op.id]
        if op.id is not None and not chosen:
            raise InvalidField(f"no failed delivery {op.id!r}", path="$.id")
        for key, failure in chosen:
            delivery = Delivery(id=failure.id, team=team, subscription=failure.subscription, event=failure.event)
            # A new message id: the failed one may still be in the duplicate window.
            await self._queue(delivery, f"{failure.subscription}.{failure.id}.retry.{time.time_ns()}")
            await self.failures.delete(key)
        return NotifyReply(retried=len(chosen))

    async def _failures(self, team: str) -> list[tuple[str, DeliveryFailure]]:
        found = []
        with contextlib.suppress(NoKeysError):
            for key in await self.failures.keys():
                if key.partition(".")[0] != team:
                    continue
                with contextlib.suppress(KeyNotFoundError):
                    entry = await self.failures.get(key)
                    if entry.value:
                        found.append((key, decode(entry.value, DeliveryFailure)))
        return sorted(found, key=lambda kf: kf[1].at)
