"""Subject names and JetStream objects, and `ensure()` that creates or updates them.

Every name derives from the settings' prefix, so several independent queues (and every
test) can share one NATS server without seeing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from . import jetstream
from .config import Settings

__all__ = ["LOWERING", "Confirm", "Mismatch", "Topology", "consumer_filters"]

log = logging.getLogger("evalq.topology")

STREAM_IN_USE = 10058
T = TypeVar("T")
_TRANSIENT = (ServiceUnavailableError, NoRespondersError, NatsTimeout, asyncio.TimeoutError)


@dataclass(frozen=True)
class Mismatch:
    """An existing object's setting that differs from this process's: reported, not rewritten."""

    object: str
    setting: str
    current: Any
    wanted: Any

    def __str__(self) -> str:
        return (
            f"{self.object}: {self.setting} is {self.current!r} on the server, this process has {self.wanted!r}; "
            "the server's value is in force (`evalq setup` applies this process's settings)"
        )


# The settings `ensure` compares on objects that exist; names the server may fill in
# itself (created, sealed, ...) are left out.
_OWNED_STREAM_FIELDS = (
    "num_replicas",
    "max_msgs",
    "max_age",
    "max_bytes",
    "max_msgs_per_subject",
    "duplicate_window",
)
_OWNED_CONSUMER_FIELDS = ("ack_wait", "max_deliver", "max_ack_pending")

# A key of the work consumer's metadata, there while `evalq setup` lowers the pool's ack_wait:
# the value it is about to apply. Whoever reads the consumer's ack_wait meanwhile (a worker
# taking a message, or renewing one) renews for the lower value already, so a worker the
# announcement missed, or one that takes a message after it, is not left at the old pace.
LOWERING = "evalq.ack_wait.lowering"

# What `apply` awaits before it lowers ack_wait: pool -> the new value. It raises to stop the
# change; `renewal.confirm_lowering` asks the pools' workers.
Confirm = Callable[[dict[str, float]], Awaitable[None]]


@dataclass(frozen=True)
class Topology:
    """Names of every subject, stream, consumer and bucket for one prefix."""

    prefix: str = "evalq"
    replicas: int = 1
    queue_limit: int = 1_000_000
    ack_wait: float = 12.0
    duplicate_window: float = 300.0
    events_max_age: float = 30 * 86400.0
    events_per_subject: int = 1000
    idempotency_ttl: float = 86400.0
    journal_max_age: float = 7 * 86400.0
    cache_max_age: float = 30 * 86400.0
    cache_max_bytes: int = -1

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            prefix=settings.queue.prefix,
            replicas=settings.queue.replicas,
            queue_limit=settings.queue.queue_limit,
            ack_wait=settings.queue.ack_wait,
            duplicate_window=settings.queue.duplicate_window,
            events_max_age=settings.queue.events_max_age_days * 86400.0,
            events_per_subject=settings.queue.events_per_subject,
            idempotency_ttl=settings.queue.idempotency_ttl,
            journal_max_age=settings.queue.journal_max_age_days * 86400.0,
            cache_max_age=settings.queue.cache_max_age_days * 86400.0,
            cache_max_bytes=settings.queue.cache_max_bytes,
        )

    # --- subjects -----------------------------------------------------------------

    def subject(self, endpoint: str) -> str:
        """`<prefix>.submit`, `<prefix>.status`, ..."""
        return f"{self.prefix}.{endpoint}"

    def work_subject(self, pool: str, job_id: str) -> str:
        return f"{self.prefix}.work.{pool}.{job_id}"

    def work_subjects(self, pool: str) -> str:
        """Every subject of the pool's work stream."""
        return f"{self.prefix}.work.{pool}.>"

    def pieces_subjects(self, pool: str) -> str:
        """Every subject of the pool's pieces stream."""
        return f"{self.prefix}.pieces.{pool}.>"

    def piece_subject(self, pool: str, job_id: str, step: str) -> str:
        """`<prefix>.pieces.<pool>.<job_id>.<index>`, or `....merge` for the merge step."""
        return f"{self.prefix}.pieces.{pool}.{job_id}.{step}"

    def event_subject(self, job_id: str, kind: str, *, team: str) -> str:
        """`<prefix>.events.<team>.<job_id>.<type>`: by the team token an account is given only its own."""
        return f"{self.prefix}.events.{team}.{job_id}.{kind}"

    def journal_subject(self, job_id: str, part: str) -> str:
        """`<prefix>.journal.<job_id>.<part>`: one evaluation's response journal (`whole`, a
        piece `p<index>`); `part` `>` names all of a job's."""
        return f"{self.prefix}.journal.{job_id}.{part}"

    def cache_subject(self, model: str) -> str:
        """`<prefix>.cache.<model>`: the cached responses of one model identity (a hash)."""
        return f"{self.prefix}.cache.{model}"

    def ack_wait_subject(self, pool: str) -> str:
        """`<prefix>.control.ack_wait.<pool>`: core NATS, `evalq setup` to the pool's workers."""
        return f"{self.prefix}.control.ack_wait.{pool}"

    def events_filter(self, job_id: str = "*", kind: str = "*", *, team: str = "*") -> str:
        """Any team by default: a job id (a UUID) is unique across teams, so a reader needs no team."""
        if job_id == "*" and kind == "*" and team == "*":
            return f"{self.prefix}.events.>"
        return f"{self.prefix}.events.{team}.{job_id}.{kind}"

    # --- JetStream names -----------------------------------------------------------

    @property
    def stream_prefix(self) -> str:
        return self.prefix.upper().replace("-", "_")

    def work_stream(self, pool: str) -> str:
        return f"{self.stream_prefix}_WORK_{pool}"

    def pieces_stream(self, pool: str) -> str:
        return f"{self.stream_prefix}_PIECES_{pool}"

    def pool_of_stream(self, stream: str) -> str | None:
        head = f"{self.stream_prefix}_WORK_"
        return stream[len(head) :] if stream.startswith(head) else None

    @property
    def events_stream(self) -> str:
        return f"{self.stream_prefix}_EVENTS"

    @property
    def journal_stream(self) -> str:
        return f"{self.stream_prefix}_JOURNAL"

    @property
    def cache_stream(self) -> str:
        return f"{self.stream_prefix}_CACHE"

    @property
    def consumer(self) -> str:
        return f"{self.prefix}-worker"

    @property
    def jobs_bucket(self) -> str:
        return f"{self.prefix}-jobs"

    @property
    def idempotency_bucket(self) -> str:
        return f"{self.prefix}-idempotency"

    @property
    def workers_bucket(self) -> str:
        return f"{self.prefix}-workers"

    @property
    def pools_bucket(self) -> str:
        return f"{self.prefix}-pools"

    @property
    def gates_bucket(self) -> str:
        """`<team>.<name>` -> a stored GatePolicy (gateway/gatekeeper.py)."""
        return f"{self.prefix}-gates"

    @property
    def notify_bucket(self) -> str:
        """`<team>.<name>` -> a webhook Subscription, secret included (gateway/notifier.py)."""
        return f"{self.prefix}-notify"

    @property
    def notify_failures_bucket(self) -> str:
        """`<team>.<subscription>.<delivery id>` -> a DeliveryFailure."""
        return f"{self.prefix}-notify-failures"

    @property
    def deliveries_stream(self) -> str:
        return f"{self.stream_prefix}_DELIVERIES"

    def delivery_subject(self, team: str, subscription: str) -> str:
        return f"{self.prefix}.deliveries.{team}.{subscription}"

    @property
    def notify_consumer(self) -> str:
        """The durable consumer on the events stream that turns events into deliveries."""
        return f"{self.prefix}-notify"

    @property
    def deliver_consumer(self) -> str:
        """The durable consumer on the deliveries stream that POSTs them."""
        return f"{self.prefix}-deliver"

    @property
    def results_bucket(self) -> str:
        return f"{self.prefix}-results"

    @property
    def service_name(self) -> str:
        return f"{self.prefix}-gateway"

    # --- definitions ----------------------------------------------------------------

    def work_stream_config(self, pool: str) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.work_stream(pool),
            description=f"evalq jobs waiting or running in pool {pool}",
            subjects=[self.work_subjects(pool)],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
            max_msgs=self.queue_limit,
            # A full queue refuses new jobs (503) rather than dropping old ones.
            discard=api.DiscardPolicy.NEW,
        )

    def pieces_stream_config(self, pool: str) -> api.StreamConfig:
        # The pieces of started sharded jobs (and their merge steps). Workers fetch from it
        # before the work stream: what was started finishes before new jobs start.
        return api.StreamConfig(
            name=self.pieces_stream(pool),
            description=f"evalq pieces of sharded jobs started in pool {pool}",
            subjects=[self.pieces_subjects(pool)],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
        )

    def consumer_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.consumer,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            # Unlimited: the worker counts attempts and fails a poison job itself, so the
            # reason reaches the job's record instead of the message silently vanishing.
            max_deliver=-1,
            max_ack_pending=10_000,
        )

    def _kept_stream(self, name: str, description: str, subjects: str, **limits: Any) -> api.StreamConfig:
        """A stream that keeps what it is sent until its limits drop it (file storage, the
        queue's replicas): events, journals and the cache differ only in their limits."""
        return api.StreamConfig(
            name=name,
            description=description,
            subjects=[subjects],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            **limits,
        )

    def events_stream_config(self) -> api.StreamConfig:
        return self._kept_stream(
            self.events_stream,
            "evalq job status events",
            f"{self.prefix}.events.>",
            max_age=self.events_max_age,
            max_msgs_per_subject=self.events_per_subject,
            duplicate_window=min(self.duplicate_window, self.events_max_age),
        )

    def journal_stream_config(self) -> api.StreamConfig:
        # A failed or cancelled job's journal is removed; a completed job's is kept this long,
        # for re-scoring. A removal replaces a part's frames with one empty message
        # (`Nats-Rollup: sub`): a worker may publish, never purge.
        return self._kept_stream(
            self.journal_stream,
            "evalq response journals: each evaluation's responses and scores",
            f"{self.prefix}.journal.>",
            max_age=self.journal_max_age,
            allow_rollup_hdrs=True,
        )

    def cache_stream_config(self) -> api.StreamConfig:
        return self._kept_stream(
            self.cache_stream,
            "evalq response cache: model responses by model identity",
            f"{self.prefix}.cache.>",
            max_age=self.cache_max_age,
            max_bytes=self.cache_max_bytes,
            discard=api.DiscardPolicy.OLD,
        )

    def deliveries_stream_config(self) -> api.StreamConfig:
        # One message per (event, subscription), removed once delivered or given up on.
        return api.StreamConfig(
            name=self.deliveries_stream,
            description="evalq webhook deliveries waiting to be made",
            subjects=[f"{self.prefix}.deliveries.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
        )

    def notify_consumer_config(self) -> api.ConsumerConfig:
        kinds = ("completed", "failed", "cancelled", "gated")
        return api.ConsumerConfig(
            durable_name=self.notify_consumer,
            filter_subjects=[self.events_filter(kind=kind) for kind in kinds],  # every team's
            ack_policy=api.AckPolicy.EXPLICIT,
            # Events from when notifications began: a new queue does not announce its past.
            deliver_policy=api.DeliverPolicy.NEW,
            ack_wait=30.0,
            max_deliver=-1,
            max_ack_pending=1000,
        )

    def deliver_consumer_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.deliver_consumer,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            # Longer than a POST may take; the notifier counts the attempts itself.
            ack_wait=120.0,
            max_deliver=-1,
            max_ack_pending=1000,
        )

    # --- ensure -----------------------------------------------------------------------

    async def ensure(
        self,
        js: JetStreamContext,
        pools: tuple[str, ...] = ("default",),
        *,
        update: bool = False,
        timeout: float = 30.0,
    ) -> list[Mismatch]:
        """Create every missing object; running it twice changes nothing.

        Objects that exist are left as they are: the queue's settings belong to whoever
        created it, or to `evalq setup` (`update=True`), never to a process that happens to
        start with other values. Each difference is returned and logged, so it is visible.
        Retries transient errors (a cluster still electing a leader) until `timeout`.
        """
        found = await _retrying(time.monotonic() + timeout, lambda: self._ensure_once(js, pools, update))
        for mismatch in found:
            log.warning("%s", mismatch)
        return found

    async def apply(
        self,
        js: JetStreamContext,
        pools: tuple[str, ...],
        *,
        dry_run: bool = False,
        timeout: float = 30.0,
        confirm: Confirm | None = None,
    ) -> list[Mismatch]:
        """Bring the queue's objects to this topology's settings (what `evalq setup` does).

        Creates what is missing, and returns each owned setting that differed; those are
        updated unless `dry_run`. Nothing is logged: the differences are the caller's answer.

        A higher ack_wait is safe at once. A lower one would have the server redeliver a
        message whose worker still renews it at the old pace, so the pools it lowers are first
        marked (`LOWERING`) and `confirm` awaited; if it raises, the marks are taken back and
        nothing is changed.
        """
        found = await _retrying(time.monotonic() + timeout, lambda: self._ensure_once(js, pools, False))
        if not found or dry_run:
            return found
        lowering: dict[str, float] = {}
        for pool in pools:
            highest = max(await _retrying(time.monotonic() + timeout, partial(self._ack_waits, js, pool)))
            if highest > self.ack_wait and not _same(highest, self.ack_wait):
                lowering[pool] = self.ack_wait
        marked: list[str] = []
        try:
            for pool in lowering:
                await _retrying(time.monotonic() + timeout, partial(self.mark_lowering, js, pool, self.ack_wait))
                marked.append(pool)
            if lowering and confirm is not None:
                await confirm(lowering)
            # The update writes the consumer without the mark: the lower value is in force.
            await _retrying(time.monotonic() + timeout, lambda: self._ensure_once(js, pools, True))
        except BaseException:
            for pool in marked:
                with contextlib.suppress(Exception):
                    await self.mark_lowering(js, pool, None)
            raise
        return found

    async def mark_lowering(self, js: JetStreamContext, pool: str, ack_wait: float | None) -> None:
        """Set (or, with None, take back) the `LOWERING` mark on the pool's work consumer; its
        other settings are written back as the server has them."""
        stream = self.work_stream(pool)
        config = (await js.consumer_info(stream, self.consumer)).config
        metadata = {key: value for key, value in (config.metadata or {}).items() if key != LOWERING}
        if ack_wait is not None:
            metadata[LOWERING] = repr(float(ack_wait))
        await js.add_consumer(stream, config.evolve(metadata=metadata))

    async def _ack_waits(self, js: JetStreamContext, pool: str) -> list[float]:
        return [
            float((await js.consumer_info(stream, self.consumer)).config.ack_wait or self.ack_wait)
            for stream in (self.work_stream(pool), self.pieces_stream(pool))
        ]

    async def ensure_pool(self, js: JetStreamContext, pool: str, *, timeout: float = 30.0) -> list[Mismatch]:
        """Create one pool's work stream and consumer if missing (a worker's or a gateway's first use)."""
        return await _retrying(time.monotonic() + timeout, lambda: self._ensure_pool(js, pool, False))

    async def _ensure_once(self, js: JetStreamContext, pools: tuple[str, ...], update: bool) -> list[Mismatch]:
        found = await _put_stream(js, self.events_stream_config(), update)
        found += await _put_stream(js, self.journal_stream_config(), update)
        found += await _put_stream(js, self.cache_stream_config(), update)
        found += await _put_kv(
            js,
            api.KeyValueConfig(
                bucket=self.jobs_bucket, history=1, replicas=self.replicas, storage=api.StorageType.FILE
            ),
            update,
        )
        found += await _put_kv(
            js,
            api.KeyValueConfig(
                bucket=self.idempotency_bucket,
                ttl=self.idempotency_ttl,
                replicas=self.replicas,
                storage=api.StorageType.FILE,
            ),
            update,
        )
        # No bucket-wide max age: each worker's entry carries its own TTL (Nats-TTL), three
        # of its own heartbeats, so workers with different heartbeats share the bucket.
        workers = api.KeyValueConfig(bucket=self.workers_bucket, replicas=self.replicas, storage=api.StorageType.FILE)
        found += await _put_kv(js, workers, update, migrate=True)
        # Pool name -> PoolPolicy; only `evalq setup` writes it (policy.py).
        policies = api.KeyValueConfig(bucket=self.pools_bucket, replicas=self.replicas, storage=api.StorageType.FILE)
        found += await _put_kv(js, policies, update)
        for bucket in (self.gates_bucket, self.notify_bucket, self.notify_failures_bucket):
            config = api.KeyValueConfig(bucket=bucket, replicas=self.replicas, storage=api.StorageType.FILE)
            found += await _put_kv(js, config, update)
        found += await _put_stream(js, self.deliveries_stream_config(), update)
        for stream, consumer in (
            (self.events_stream, self.notify_consumer_config()),
            (self.deliveries_stream, self.deliver_consumer_config()),
        ):
            found += await _put_consumer(js, stream, consumer, update)
        try:
            await js.create_object_store(
                self.results_bucket, config=api.ObjectStoreConfig(replicas=self.replicas, storage=api.StorageType.FILE)
            )
        except BadRequestError as exc:
            if exc.err_code != STREAM_IN_USE:
                raise
            found += await _check_stream(
                js, jetstream.object_stream(self.results_bucket), {"num_replicas": self.replicas}, update
            )
        for pool in pools:
            found += await self._ensure_pool(js, pool, update)
        return found

    async def _ensure_pool(self, js: JetStreamContext, pool: str, update: bool) -> list[Mismatch]:
        found: list[Mismatch] = []
        for config in (self.work_stream_config(pool), self.pieces_stream_config(pool)):
            found += await _put_stream(js, config, update)
            stream = str(config.name)
            wanted = self.consumer_config()
            try:
                current = await js.consumer_info(stream, self.consumer)
            except NotFoundError:
                await js.add_consumer(stream, wanted)
                continue
            differs = {
                name: (getattr(current.config, name), getattr(wanted, name))
                for name in _OWNED_CONSUMER_FIELDS
                if not _same(getattr(current.config, name), getattr(wanted, name))
            }
            if update and (differs or LOWERING in (current.config.metadata or {})):
                # An update of a durable with the same name; it also drops a mark that a
                # setup which never finished left behind.
                await js.add_consumer(stream, wanted)
            elif differs:
                found += [Mismatch(f"consumer {stream}/{self.consumer}", k, *v) for k, v in differs.items()]
        return found

    async def ack_wait_of(self, js: JetStreamContext, pool: str) -> float:
        """The ack_wait a worker of `pool` must renew its message for: the consumer's as it is on
        the server (it may differ from this process's), or the lower one `evalq setup` is about
        to apply (`LOWERING`)."""
        config = (await js.consumer_info(self.work_stream(pool), self.consumer)).config
        found = float(config.ack_wait or self.ack_wait)
        with contextlib.suppress(ValueError):
            found = min(found, float((config.metadata or {}).get(LOWERING, "inf")))
        return found

    async def pools(self, js: JetStreamContext) -> list[str]:
        """The pools whose work stream exists, sorted (asks for this prefix's streams only)."""
        streams = await jetstream.stream_names(jetstream.Api.of_context(js), subject=f"{self.prefix}.work.>")
        return sorted(pool for pool in map(self.pool_of_stream, streams) if pool is not None)

    async def has_pool(self, js: JetStreamContext, pool: str) -> bool:
        try:
            await jetstream.stream_info(jetstream.Api.of_context(js), self.work_stream(pool))
        except NotFoundError:
            return False
        return True


async def _retrying(deadline: float, step: Callable[[], Awaitable[T]]) -> T:
    delay = 0.1
    while True:
        try:
            return await step()
        except _TRANSIENT:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)  # back-off while a JetStream leader is elected
            delay = min(delay * 2, 2.0)


async def _put_stream(js: JetStreamContext, config: api.StreamConfig, update: bool) -> list[Mismatch]:
    try:
        await js.add_stream(config)
        return []
    except BadRequestError as exc:
        if exc.err_code != STREAM_IN_USE:
            raise
    assert config.name is not None
    owned = {name: getattr(config, name) for name in _OWNED_STREAM_FIELDS if getattr(config, name) is not None}
    return await _check_stream(js, config.name, owned, update)


async def _put_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig, update: bool) -> list[Mismatch]:
    """A durable consumer of the queue's own (the notifier's): created when missing, written
    again by `evalq setup`."""
    try:
        found = await js.consumer_info(stream, str(config.durable_name))
    except NotFoundError:
        await js.add_consumer(stream, config)
        return []
    # One made for an older layout of the subjects would hear nothing: its filters are this
    # version's to set, as its other settings are (no operator chooses them).
    if update or consumer_filters(found.config) != consumer_filters(config):
        await js.add_consumer(stream, config)
    return []


def consumer_filters(config: api.ConsumerConfig) -> list[str]:
    """A consumer's filter subjects, whichever field holds them."""
    return sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


async def _put_kv(
    js: JetStreamContext, config: api.KeyValueConfig, update: bool, *, migrate: bool = False
) -> list[Mismatch]:
    try:
        await js.create_key_value(config)
        return []
    except BadRequestError as exc:
        if exc.err_code != STREAM_IN_USE:
            raise
    stream = jetstream.kv_stream(config.bucket)
    owned: dict[str, Any] = {"num_replicas": config.replicas, "max_age": config.ttl or 0.0}
    if migrate:
        # Older versions gave the workers bucket a max age; entries now carry their own TTL.
        info = await js.stream_info(stream)
        if info.config.max_age or not info.config.allow_msg_ttl:
            log.info("workers bucket %s: entries now expire by their own TTL", config.bucket)
            await js.update_stream(info.config.evolve(max_age=0.0, allow_msg_ttl=True))
    return await _check_stream(js, stream, owned, update)


def _same(current: Any, wanted: Any) -> bool:
    """Durations travel as whole nanoseconds: 1.001 s comes back as 1.000999999."""
    if isinstance(current, float | int) and isinstance(wanted, float | int):
        return round(current * 1e9) == round(wanted * 1e9) or abs(current - wanted) < 1e-6
    return bool(current == wanted)


async def _check_stream(js: JetStreamContext, stream: str, owned: dict[str, Any], update: bool) -> list[Mismatch]:
    """Compare an existing stream's owned settings with `owned`; update it only when asked."""
    current = (await js.stream_info(stream)).config
    differs = {
        name: (getattr(current, name), want) for name, want in owned.items() if not _same(getattr(current, name), want)
    }
    if not differs:
        return []
    if update:
        await js.update_stream(current.evolve(**{name: want for name, (_, want) in differs.items()}))
        return []
    return [Mismatch(f"stream {stream}", name, have, want) for name, (have, want) in differs.items()]
