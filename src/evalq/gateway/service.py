"""The `evalq-gateway` NATS micro service: validate, enqueue, and answer about jobs.

Every endpoint's handler returns a reply Struct or raises; `_serve` is the one place
where exceptions become error replies (micro error headers plus a JSON body).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType

import msgspec
from nats.aio.client import Client
from nats.js.errors import (
    APIError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from .. import __version__, jetstream, lifecycle
from ..config import Settings
from ..errors import (
    JobNotFound,
    Unavailable,
    WrongState,
)
from ..events import EventPublisher
from ..jobstore import JobStore
from ..lifecycle import Applied, Recorder, Refused
from ..metrics import GatewayMetrics
from ..policy import Policies
from ..registry import Registry
from ..scheduling import team_uses
from ..schemas import (
    CancelReply,
    CreationClock,
    EvaluateRequest,
    Event,
    Health,
    JobAccepted,
    JobInfo,
    JobRef,
    JobsPage,
    JobsQuery,
    ModelsReply,
    PieceItem,
    QueuedRow,
    QueueStatus,
    TasksReply,
    TeamsReply,
    WorkerInfo,
    decode,
    encode,
    event_type,
    now,
)
from ..topology import Topology
from .checks import PoolNames, SubmitChecks
from .dispatcher import Dispatcher
from .gatekeeper import Gatekeeper
from .gauges import watch_queue
from .history import History, summarize
from .idempotency import KeyClaim, key_digest, read_claim, request_fingerprint
from .identity import Requester, of_request
from .notifier import Notifier
from .reads import Reads
from .refusals import FULL_CODES, as_request_error

__all__ = ["Gateway"]

log = logging.getLogger("evalq.gateway")

Handler = Callable[[Request], Awaitable[msgspec.Struct]]


class Gateway:
    """The gateway service on one connection. `async with Gateway(nc, settings):` serves."""

    def __init__(self, nc: Client, settings: Settings, topology: Topology | None = None) -> None:
        self.nc = nc
        self.settings = settings
        self.topology = topology or Topology.from_settings(settings)
        domain = settings.connection.js_domain
        self.js = nc.jetstream(timeout=settings.connection.request_timeout, domain=domain)
        self.pipeline = jetstream.Pipeline(nc)
        self.metrics = GatewayMetrics()
        self.events = EventPublisher(
            nc,
            self.topology,
            timeout=settings.connection.request_timeout,
            domain=domain,
            observe=lambda event: self.metrics.events.sent.labels(event_type(event)).inc(),
        )
        self._service: Service | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._created = CreationClock()
        self._slots = asyncio.Semaphore(settings.gateway.gateway_concurrency)
        self.in_flight = 0
        self.peak_in_flight = 0  # how many requests were being served at once, at most

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> Gateway:
        await self.topology.ensure(self.js)
        self.jobs = JobStore(await self.js.key_value(self.topology.jobs_bucket))
        self.recorder = Recorder(self.jobs, self.events)
        self.idempotency = await self.js.key_value(self.topology.idempotency_bucket)
        # Followed by a watch; the bucket is small, so it is loaded before serving starts.
        self.registry = await Registry(await self.js.key_value(self.topology.workers_bucket), nc=self.nc).start(
            self.settings.connection.request_timeout
        )
        self.policies = Policies(await self.js.key_value(self.topology.pools_bucket))
        # Loads in the background past a second: a long history must not hold up serving.
        self.history = await History(self.jobs.kv, nc=self.nc).start(wait=1.0)
        watch_queue(self.metrics, self.history, self.registry)
        self.pools = PoolNames(self.topology, self.js)
        await self.pools.load()
        self.dispatcher = await Dispatcher(
            self.nc,
            self.topology,
            history=self.history,
            registry=self.registry,
            # Its own cache: its passes would keep the submit checks' copy from being read afresh.
            policies=Policies(self.policies.kv),
            recorder=self.recorder,
            pools=self.pools.known,
            js=self.js,
            timeout=self.settings.connection.request_timeout,
        ).start()
        self.gatekeeper = await Gatekeeper(
            self.js, jetstream.Api.of_context(self.js), self.topology, history=self.history, recorder=self.recorder
        ).start()
        self.notifier = await Notifier(
            self.nc,
            self.js,
            self.topology,
            jobs=self.jobs,
            settings=self.settings.gateway,
            timeout=self.settings.connection.request_timeout,
        ).start()
        self.reads = Reads(jetstream.Api.of_context(self.js), self.topology, self.jobs)
        self.checks = SubmitChecks(
            max_bytes=self.settings.gateway.max_request_bytes,
            pools=self.pools,
            jobs=self.jobs,
            registry=self.registry,
            policies=self.policies,
        )
        group = self.topology.service_name
        self._service = await add_service(
            self.nc,
            name=group,
            version=__version__,
            description="evalq: validates and enqueues lmms-eval jobs",
            queue_group=group,
        )
        endpoints: dict[str, Handler] = {
            "submit": self.submit,
            "status": self.status,
            "cancel": self.cancel,
            "queue": self.queue,
            "health": self.health,
            "tasks": self.tasks,
            "models": self.models,
            "jobs": self.list_jobs,
            "teams": self.teams,
            "gate": self.gatekeeper.serve,
            "notify": self.notifier.serve,
            "read": self.reads.serve,
        }
        for name, handler in endpoints.items():
            await self._service.add_endpoint(
                name=name, subject=self.topology.subject(name), handler=self._spawn(name, handler), queue_group=group
            )
        log.info("gateway %s serving %s.* on %s", self._service.id, self.topology.prefix, self.nc.connected_url)
        return self

    async def stop(self) -> None:
        """Stop taking requests, then let those in flight finish."""
        if self._service is not None:
            await _drain_endpoints(self._service)
            await self._service.stop()
            self._service = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.settings.connection.request_timeout)
        for task in (
            getattr(self, "dispatcher", None),
            getattr(self, "gatekeeper", None),
            getattr(self, "notifier", None),
        ):
            if task is not None:
                await task.stop()
        for follower in (getattr(self, "history", None), getattr(self, "registry", None)):
            if follower is not None:
                await follower.stop()

    @property
    def ready(self) -> bool:
        """Serving, connected, with its job history loaded: what a readiness probe asks."""
        return self._service is not None and self.nc.is_connected and self.history.loaded.is_set()

    async def __aenter__(self) -> Gateway:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- the error boundary ------------------------------------------------------------

    def _spawn(self, name: str, handler: Handler) -> Callable[[Request], Awaitable[None]]:
        # nats-py runs one subscription's callbacks one after another; a task per request
        # keeps a slow JetStream round trip from holding up every other request.
        async def on_request(request: Request) -> None:
            task = asyncio.create_task(self._serve(name, handler, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_request

    async def _serve(self, name: str, handler: Handler, request: Request) -> None:
        started = time.perf_counter()
        async with self._slots:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                reply = encode(await handler(request))
            except Exception as exc:
                error = as_request_error(exc)
                description = " ".join(error.message.split())[:512]
                await self._respond(request, encode(error.to_body()), str(error.code), description)
                self.metrics.request(name, str(error.code), time.perf_counter() - started)
                return
            finally:
                self.in_flight -= 1
            await self._respond(request, reply)
            self.metrics.request(name, "ok", time.perf_counter() - started)

    @staticmethod
    async def _respond(request: Request, data: bytes, code: str | None = None, description: str = "") -> None:
        try:
            if code is None:
                await request.respond(data, headers={"Content-Type": "application/json"})
            else:
                await request.respond_error(code, description, data, headers={"Content-Type": "application/json"})
        except ValueError:
            pass  # published without a reply subject: nobody to answer
        except Exception:
            log.warning("could not send a reply", exc_info=True)

    # --- endpoints -------------------------------------------------------------------------

    async def submit(self, request: Request) -> JobAccepted:
        # From the server's header only: the request has no field that could name a team.
        requester = of_request(request)
        job = await self.checks.request(request.data, requester)

        job_id, duplicate = str(uuid.uuid4()), False
        key = (request.headers or {}).get("Idempotency-Key")
        if key is not None:
            claimed, existing = await self._claim(key_digest(key, requester.team), job, job_id)
            if existing is not None:
                return await self._accepted(existing, duplicate=True)
            # Another id with no record: the first attempt with this key died before recording
            # the job, so its work goes on under that id; the stream's Nats-Msg-Id window
            # keeps it to one message.
            job_id, duplicate = claimed, claimed != job_id

        queued = self.history.index.queued_in(job.pool)
        if queued.total() >= self.topology.queue_limit:
            raise Unavailable(
                f"the queue is full: pool {job.pool!r} holds {queued.total()} queued jobs (queue_limit); retry later"
            )
        await self.checks.team_limits(job, requester.team, queued[requester.team])
        await self.gatekeeper.require(requester.team, job.gate)
        created = self._created()
        info = lifecycle.enqueue(
            job_id, job, created_at=created, stream_seq=None, team=requester.team, user=requester.user
        )
        # The record is the queue: the dispatcher admits the job into the work stream in the
        # scheduler's order. The `queued` event and the create-only record go out together
        # (one round trip); a worker that takes the job makes sure `queued` is in the events
        # stream before it publishes `started` (Recorder.ensure_queued_event).
        sent = [
            await self.pipeline.send(self.events.write(lifecycle.queued_event(info))),
            await self.pipeline.send(jetstream.key_create(self.topology.jobs_bucket, job_id, encode(info))),
        ]
        event_outcome: jetstream.PubAck | BaseException | None
        event_outcome, record_outcome = await self.pipeline.wait(sent, timeout=self.settings.connection.request_timeout)
        # A record that exists was written by an earlier attempt under the same Idempotency-Key.
        record_exists = isinstance(record_outcome, KeyWrongLastSequenceError)
        full = [o for o in (event_outcome, record_outcome) if isinstance(o, APIError) and o.err_code in FULL_CODES]
        if full and not record_exists and not duplicate:
            if isinstance(record_outcome, jetstream.PubAck):
                # The record is the job, and a record cannot be taken back (a bucket permits no
                # message delete, and a delete marker needs the room there is not): the job
                # stands, and the worker that takes it publishes its `queued` event first.
                log.warning("job %s: queued without its queued event (the store is full)", job_id)
                event_outcome = None
            else:
                # Take back what landed, so that a 503 means the job does not exist (a retry
                # with the key makes it anew).
                await self._take_back(job_id, event_outcome, key and key_digest(key, requester.team))
                raise full[0]
        for outcome in (event_outcome, None if record_exists else record_outcome):
            if isinstance(outcome, BaseException):
                raise outcome
        if record_exists:
            found = await self.jobs.get(job_id)
            if found is not None:
                return await self._accepted(found[0], duplicate=True)
        assert isinstance(record_outcome, jetstream.PubAck)
        seq = record_outcome.seq
        self.history.note(summarize(encode(info)), seq)
        noted = self.history.index.version
        # Every record written before this one is in the index once the watch reaches it.
        await self.history.caught_up(seq - 1, timeout=self.settings.connection.request_timeout)
        self.history.changed.set()
        # Submissions in a burst share one plan: any plan made since this job was noted holds it.
        plan = await self.dispatcher.plan(job.pool, at_least=noted)
        return JobAccepted(
            job_id=job_id,
            status="queued",
            position_in_queue=plan.position(job_id),
            stream_seq=seq,
            duplicate=duplicate,
            message="Job queued (duplicate of an earlier submission)" if duplicate else "Job queued",
            waiting=plan.why.get(job_id),
        )

    async def _take_back(
        self, job_id: str, event: jetstream.PubAck | BaseException | None, claimed: str | None
    ) -> None:
        """Undo a submission whose record could not be stored, best effort. The event is
        deleted by sequence, which frees room; the key goes last, so that its retry makes the
        job anew rather than finding an id with no record."""
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if isinstance(event, jetstream.PubAck):
            steps.append(("queued event", lambda: self.js.delete_msg(self.topology.events_stream, event.seq)))
        if claimed:  # the Idempotency-Key's digest in the idempotency bucket
            steps.append(("key", lambda: self.idempotency.delete(claimed)))
        for what, step in steps:
            try:
                await step()
            except Exception as exc:
                log.warning("job %s: could not take back its %s after the store filled: %s", job_id, what, exc)

    async def _claim(self, digest: str, job: EvaluateRequest, job_id: str) -> tuple[str, JobInfo | None]:
        """Tie an Idempotency-Key (its `key_digest`) to this request under `job_id`, or find
        the job it names.

        Returns the job id to enqueue under and the job's record, if it has one. A key that
        was used for a different request is refused (409): answering with that job would
        silently drop this one.
        """
        fingerprint = request_fingerprint(job)
        try:
            await jetstream.create_key(
                self.nc,
                self.topology.idempotency_bucket,
                digest,
                encode(KeyClaim(job_id=job_id, fingerprint=fingerprint)),
                timeout=self.settings.connection.request_timeout,
            )
            return job_id, None
        except KeyWrongLastSequenceError:
            pass
        entry = await self.idempotency.get(digest)
        claim = read_claim(entry.value or b"")
        found = await self.jobs.get(claim.job_id)
        existing = found[0] if found is not None else None
        used_for = claim.fingerprint
        if used_for is None and existing is not None and existing.request is not None:
            # An entry written before fingerprints were stored: the record's request stands in.
            used_for = request_fingerprint(existing.request)
        if used_for is not None and used_for != fingerprint:
            raise WrongState(
                f"this Idempotency-Key was already used for another request (job {claim.job_id}); "
                "a different request needs a new key",
                path="$",
            )
        return claim.job_id, existing

    async def _accepted(self, info: JobInfo, *, duplicate: bool) -> JobAccepted:
        position, why = await self._place(info)
        return JobAccepted(
            job_id=info.job_id,
            status=info.status,
            position_in_queue=position,
            stream_seq=info.stream_seq or 0,
            duplicate=duplicate,
            message=f"Duplicate of an earlier submission; the job is {info.status}",
            waiting=why,
        )

    async def _place(self, info: JobInfo) -> tuple[int | None, str | None]:
        """A queued job's position in its pool's plan, and why it waits."""
        if info.status != "queued":
            return None, None
        plan = await self.dispatcher.plan(info.pool)
        position = plan.position(info.job_id)
        if position is None:  # not in this gateway's index yet
            plan = await self.dispatcher.plan(info.pool, fresh=True)
            position = plan.position(info.job_id)
        return position, plan.why.get(info.job_id)

    async def _job(self, request: Request) -> tuple[str, JobInfo]:
        ref = decode(request.data or b"{}", JobRef)
        found = await self.jobs.get(ref.job_id)
        # Another team's job is answered as no job at all: its existence is not theirs to learn.
        if found is None or not of_request(request).may_see(found[0].team):
            raise JobNotFound(f"no job {ref.job_id}", path="$.job_id")
        return ref.job_id, found[0]

    async def status(self, request: Request) -> JobInfo:
        _, info = await self._job(request)
        if info.status == "queued":
            position, why = await self._place(info)
            info = msgspec.structs.replace(info, position_in_queue=position, waiting=why)
        return info

    async def cancel(self, request: Request) -> CancelReply:
        job_id, _ = await self._job(request)
        stamp = now()

        def event(applied: Applied) -> Event | None:
            # Only a queued job ends here; a running one ends when its worker stops it.
            return lifecycle.terminal_event(applied.after) if applied.after.status == "cancelled" else None

        # The event goes out before the work message is deleted: if publishing fails, the
        # message stays, and the worker that takes it finds the terminal record and
        # publishes the missing event (deduplicated by Nats-Msg-Id).
        moved = await self.recorder.record(job_id, lambda info: lifecycle.request_cancel(info, at=stamp), event)
        if isinstance(moved, Refused):
            status = moved.current.status if moved.current else "unknown"
            if status == "cancelling":
                return CancelReply(job_id=job_id, status="cancelling", message="Cancellation already requested")
            raise WrongState(f"job {job_id} is {status}; only queued or running jobs can be cancelled", path="$.job_id")
        before, after = moved.before, moved.after
        if after.status == "cancelled":
            if before.admitted_at is not None:
                stream = self.topology.work_stream(before.pool)
                try:
                    stored = await self.js.get_last_msg(stream, self.topology.work_subject(before.pool, job_id))
                    assert stored.seq is not None
                    await self.js.delete_msg(stream, stored.seq)
                except NotFoundError:
                    pass  # a worker already took it; it will see the record and skip it
                except Exception as exc:
                    # The record and event say cancelled: a worker that takes the message
                    # skips it, so the cancel stands and is answered as such.
                    log.warning("job %s cancelled; its work message stays until a worker skips it: %s", job_id, exc)
            return CancelReply(job_id=job_id, status="cancelled", message="Removed from the queue")
        if after.pieces:
            return await self._cancel_pieces(before, after)
        return CancelReply(
            job_id=job_id, status="cancelling", message=f"Stopping the evaluation on worker {after.worker}"
        )

    async def _cancel_pieces(self, before: JobInfo, job: JobInfo) -> CancelReply:
        """A sharded job: its waiting pieces leave the pieces stream (the record already says
        they are cancelled), its running ones stop on their workers, and the job ends when
        none runs (here, when none was running)."""
        waiting = {p.index for p in before.pieces if p.status == "queued"}
        try:
            await self._remove_pieces(job, waiting)
        except Exception as exc:  # a worker that takes one finds the job cancelling and drops it
            log.warning("job %s: its queued pieces stay until workers drop them: %s", job.job_id, exc)
        await self.recorder.end_cancelled_if_idle(job.job_id, at=now())
        running = len(lifecycle.pieces_running(job))
        return CancelReply(
            job_id=job.job_id, status="cancelling", message=f"Stopping {running} running piece(s); queued ones removed"
        )

    async def _remove_pieces(self, job: JobInfo, indexes: set[int]) -> None:
        """Delete the messages of these pieces, found by subject. A running piece's message
        stays: if its worker dies, its redelivery is what ends the piece, and the job."""
        stream = self.topology.pieces_stream(job.pool)
        subject = self.topology.piece_subject(job.pool, job.job_id, "*")
        seq = 1
        for _ in range(len(job.pieces) + 1):  # one message per piece, and the merge step
            try:
                found = await self.js.get_msg(stream, seq, subject=subject, next=True)
            except NotFoundError:
                return
            assert found.seq is not None
            seq = found.seq + 1
            with contextlib.suppress(msgspec.DecodeError, ValueError):
                item = decode(found.data or b"", PieceItem)
                if item.step == "piece" and item.index in indexes:
                    with contextlib.suppress(NotFoundError):  # taken meanwhile: its worker drops it
                        await self.js.delete_msg(stream, found.seq)

    async def queue(self, request: Request) -> QueueStatus:
        pools = await self.pools.known()
        asker = of_request(request)
        # Counted from the history's index: no consumer is made for a count.
        counts = self.history.counts(("completed", "failed", "cancelled"))
        plans, workers = await asyncio.gather(
            asyncio.gather(*(self.dispatcher.plan(p) for p in pools)), self.registry.workers()
        )
        running = sorted({w.current_job for w in workers if w.current_job})
        workers = self._seen_by(asker, workers)
        queued: dict[str, list[str]] = {}
        rows: dict[str, list[QueuedRow]] = {}
        for pool, plan in zip(pools, plans, strict=True):
            # Another team's job is a row with its position only: its id is not theirs to learn.
            shown = [(i, j) for i, j in enumerate(plan.jobs[:1000]) if j.job_id not in running]
            queued[pool] = [j.job_id for _, j in shown if asker.may_see(j.team)]
            rows[pool] = [
                QueuedRow(
                    position=i,
                    job_id=j.job_id if asker.may_see(j.team) else None,
                    team=j.team if asker.may_see(j.team) else None,
                    priority=j.priority,
                    waiting=plan.why.get(j.job_id),
                )
                for i, j in shown
            ]
        if not asker.admin:
            running = [j for j in running if (s := self.history.index.get(j)) is not None and asker.may_see(s.team)]
        return QueueStatus(
            queue_size=sum(len(p.jobs) for p in plans),
            queued_jobs=queued,
            running_jobs=running,
            completed_jobs=counts["completed"],
            failed_jobs=counts["failed"],
            cancelled_jobs=counts["cancelled"],
            workers=workers,
            queue=rows,
        )

    async def health(self, request: Request) -> Health:
        pools = await self.pools.known()
        plans, workers = await asyncio.gather(
            asyncio.gather(*(self.dispatcher.plan(p) for p in pools)), self.registry.workers()
        )
        return Health(
            status="healthy" if self.nc.is_connected else "degraded",
            timestamp=now(),
            version=__version__,
            pools=pools,
            queue_size=sum(len(p.jobs) for p in plans),
            workers=self._seen_by(of_request(request), workers),
        )

    def _seen_by(self, asker: Requester, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        """The workers, less the job each runs where it is another team's."""
        if asker.admin:
            return workers
        return [
            w
            if w.current_job is None or ((s := self.history.index.get(w.current_job)) and asker.may_see(s.team))
            else msgspec.structs.replace(w, current_job=None)
            for w in workers
        ]

    async def teams(self, request: Request) -> TeamsReply:
        """Each team's use of each pool, its share and its limits; a team sees its own rows."""
        pools = await self.pools.known()
        asker = of_request(request)
        plans = await asyncio.gather(*(self.dispatcher.plan(p) for p in pools))
        policies = await asyncio.gather(*(self.policies.get(p) for p in pools))
        rows = team_uses(
            {pool: plan.view for pool, plan in zip(pools, plans, strict=True)},
            {pool: policy.scheduling for pool, policy in zip(pools, policies, strict=True)},
        )
        return TeamsReply(teams=[row for row in rows if asker.may_see(row.team)])

    async def list_jobs(self, request: Request) -> JobsPage:
        query = decode(request.data or b"{}", JobsQuery)
        asker = of_request(request)
        if not asker.admin:
            # A team's history is its own jobs, whatever team the query names.
            query = msgspec.structs.replace(query, team=asker.team)
        # Room for the reply's headers under the server's payload limit.
        return self.history.page(query, max_bytes=self.nc.max_payload - 4096)

    async def tasks(self, request: Request) -> TasksReply:
        return TasksReply(tasks=await self.registry.tasks())

    async def models(self, request: Request) -> ModelsReply:
        return ModelsReply(models=await self.registry.models())


async def _drain_endpoints(service: Service) -> None:
    """Take the endpoints off the queue group and answer what was already routed here.

    The service's own stop unsubscribes, which drops requests the server had delivered to
    this gateway a moment before: their callers would time out while another gateway
    could have answered. A drain withdraws interest first, so new requests go to the
    others, and then runs each request already here.
    """
    endpoints, service._endpoints = service._endpoints, []  # the service's stop would unsubscribe them again
    for endpoint in endpoints:
        subscription, endpoint._subscription = endpoint._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.drain()
