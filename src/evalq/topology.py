"""Subject names and JetStream objects, and `ensure()` that creates or updates them.

Every name derives from the settings' prefix, so several independent queues (and every
test) can share one NATS server without seeing each other.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

from .config import Settings

__all__ = ["Topology"]

STREAM_IN_USE = 10058
_TRANSIENT = (ServiceUnavailableError, NoRespondersError, NatsTimeout, asyncio.TimeoutError)


@dataclass(frozen=True)
class Topology:
    """Names of every subject, stream, consumer and bucket for one prefix."""

    prefix: str = "evalq"
    replicas: int = 1
    queue_limit: int = 1_000_000
    ack_wait: float = 60.0
    duplicate_window: float = 300.0
    events_max_age: float = 30 * 86400.0
    events_per_subject: int = 1000
    idempotency_ttl: float = 86400.0
    workers_ttl: float = 15.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            prefix=settings.prefix,
            replicas=settings.replicas,
            queue_limit=settings.queue_limit,
            ack_wait=settings.ack_wait,
            duplicate_window=settings.duplicate_window,
            events_max_age=settings.events_max_age_days * 86400.0,
            events_per_subject=settings.events_per_subject,
            idempotency_ttl=settings.idempotency_ttl,
            workers_ttl=3 * settings.heartbeat,
        )

    # --- subjects -----------------------------------------------------------------

    def subject(self, endpoint: str) -> str:
        """`<prefix>.submit`, `<prefix>.status`, ..."""
        return f"{self.prefix}.{endpoint}"

    def work_subject(self, pool: str, job_id: str) -> str:
        return f"{self.prefix}.work.{pool}.{job_id}"

    def event_subject(self, job_id: str, kind: str) -> str:
        return f"{self.prefix}.events.{job_id}.{kind}"

    def events_filter(self, job_id: str = "*", kind: str = "*") -> str:
        if job_id == "*" and kind == "*":
            return f"{self.prefix}.events.>"
        return f"{self.prefix}.events.{job_id}.{kind}"

    # --- JetStream names -----------------------------------------------------------

    @property
    def stream_prefix(self) -> str:
        return self.prefix.upper().replace("-", "_")

    def work_stream(self, pool: str) -> str:
        return f"{self.stream_prefix}_WORK_{pool}"

    def pool_of_stream(self, stream: str) -> str | None:
        head = f"{self.stream_prefix}_WORK_"
        return stream[len(head) :] if stream.startswith(head) else None

    @property
    def events_stream(self) -> str:
        return f"{self.stream_prefix}_EVENTS"

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
            subjects=[f"{self.prefix}.work.{pool}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
            max_msgs=self.queue_limit,
            # A full queue refuses new jobs (503) rather than dropping old ones.
            discard=api.DiscardPolicy.NEW,
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

    def events_stream_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.events_stream,
            description="evalq job status events",
            subjects=[f"{self.prefix}.events.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=self.replicas,
            max_age=self.events_max_age,
            max_msgs_per_subject=self.events_per_subject,
            duplicate_window=min(self.duplicate_window, self.events_max_age),
        )

    # --- ensure -----------------------------------------------------------------------

    async def ensure(
        self, js: JetStreamContext, pools: tuple[str, ...] = ("default",), *, timeout: float = 30.0
    ) -> None:
        """Create or update every object; running it twice changes nothing.

        Retries transient errors (a cluster still electing a leader) until `timeout`.
        """
        deadline = time.monotonic() + timeout
        await _retrying(deadline, lambda: self._ensure_once(js, pools))

    async def ensure_pool(self, js: JetStreamContext, pool: str, *, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        await _retrying(deadline, lambda: self._ensure_pool(js, pool))

    async def _ensure_once(self, js: JetStreamContext, pools: tuple[str, ...]) -> None:
        await _put_stream(js, self.events_stream_config())
        await _put_kv(
            js,
            api.KeyValueConfig(
                bucket=self.jobs_bucket, history=1, replicas=self.replicas, storage=api.StorageType.FILE
            ),
        )
        await _put_kv(
            js,
            api.KeyValueConfig(
                bucket=self.idempotency_bucket,
                ttl=self.idempotency_ttl,
                replicas=self.replicas,
                storage=api.StorageType.FILE,
            ),
        )
        await _put_kv(
            js,
            api.KeyValueConfig(
                bucket=self.workers_bucket, ttl=self.workers_ttl, replicas=self.replicas, storage=api.StorageType.FILE
            ),
        )
        try:
            await js.create_object_store(
                self.results_bucket, config=api.ObjectStoreConfig(replicas=self.replicas, storage=api.StorageType.FILE)
            )
        except BadRequestError as exc:
            if exc.err_code != STREAM_IN_USE:
                raise
            await _update_replicas(js, f"OBJ_{self.results_bucket}", self.replicas, None)
        for pool in pools:
            await self._ensure_pool(js, pool)

    async def _ensure_pool(self, js: JetStreamContext, pool: str) -> None:
        await _put_stream(js, self.work_stream_config(pool))
        await js.add_consumer(self.work_stream(pool), self.consumer_config())

    async def pools(self, js: JetStreamContext) -> list[str]:
        """The pools whose work stream exists, sorted (asks for this prefix's streams only, page by page)."""
        names: list[str] = []
        offset = 0
        while True:
            body = json.dumps({"subject": f"{self.prefix}.work.>", "offset": offset}).encode()
            reply = json.loads((await js._nc.request("$JS.API.STREAM.NAMES", body, timeout=10)).data)
            if "error" in reply:
                raise APIError.from_error(reply["error"])
            page = reply.get("streams") or []
            for stream in page:
                pool = self.pool_of_stream(stream)
                if pool is not None:
                    names.append(pool)
            offset += len(page)
            if not page or offset >= int(reply.get("total", 0)):
                break
        return sorted(names)

    async def has_pool(self, js: JetStreamContext, pool: str) -> bool:
        try:
            await js.stream_info(self.work_stream(pool))
        except NotFoundError:
            return False
        return True


async def _retrying(deadline: float, step: object) -> None:
    delay = 0.1
    while True:
        try:
            await step()  # type: ignore[operator]
            return
        except _TRANSIENT:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)  # back-off while a JetStream leader is elected
            delay = min(delay * 2, 2.0)


async def _put_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_IN_USE:
            raise
        await js.update_stream(config)


async def _put_kv(js: JetStreamContext, config: api.KeyValueConfig) -> None:
    try:
        await js.create_key_value(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_IN_USE:
            raise
        await _update_replicas(js, f"KV_{config.bucket}", config.replicas, config.ttl)


async def _update_replicas(js: JetStreamContext, stream: str, replicas: int, max_age: float | None) -> None:
    info = await js.stream_info(stream)
    current = info.config
    if current.num_replicas == replicas and (max_age is None or current.max_age == max_age):
        return
    try:
        await js.update_stream(
            current.evolve(num_replicas=replicas, max_age=max_age if max_age is not None else current.max_age)
        )
    except APIError:
        raise
