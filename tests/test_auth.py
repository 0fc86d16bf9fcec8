"""Authentication and least privilege with deploy/nats/accounts.conf, and a TLS variant.

Each test runs its own nats-server with the committed accounts file (default prefix
`evalq`); passwords come from the server's environment, certificates are made here. The
attacks a hostile submitter could make are each tried and shown refused: reading other
users' inboxes, creating consumers (durable, or pushing to a subject it chooses), and
choosing a reply subject that a gateway's or JetStream's answer would be written to.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest
import yaml

from evalq import AsyncClient, JobCancelled
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.errors import ConnectError
from evalq.gateway import Gateway
from evalq.jobstore import JobStore
from evalq.schemas import Completed, Event, JobInfo, WorkerInfo, encode, now
from evalq.topology import Topology
from evalq.worker import Worker

from .conftest import REPO
from .events import kinds
from .jobs import FAKE
from .jobs import JOB as BASE_JOB
from .waiting import eventually

ACCOUNTS = REPO / "deploy" / "nats" / "accounts.conf"
PASSWORDS = {"submitter": "s3cret-sub", "gateway": "s3cret-gw", "worker": "s3cret-wk"}
# What accounts.conf tells each role to set: its own inbox prefix.
ROLE_SETTINGS: dict[str, dict[str, Any]] = {
    "submitter": {"inbox_prefix": "_INBOX_submitter"},
    "gateway": {"inbox_prefix": "_INBOX_gateway"},
    "worker": {"inbox_prefix": "_INBOX_worker"},
}
JOB = {**BASE_JOB, "limit": 2}


def server_env() -> dict[str, str]:
    return {**os.environ, **{f"EVALQ_{user.upper()}_PASSWORD": pw for user, pw in PASSWORDS.items()}}


SHIPPED = "shipped"
# The shipped file with the submitter's user permissions opened to everything: what the
# SUBMITTERS account alone refuses, should those permissions ever be too wide.
ACCOUNT_ONLY = "account only"


@pytest.fixture
def auth_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    text = ACCOUNTS.read_text()  # included files resolve beside the including file
    if getattr(request, "param", SHIPPED) == ACCOUNT_ONLY:
        opened = re.sub(
            r"(?ms)^SUBMITTER_PERMISSIONS = \{.*?^\}$",
            'SUBMITTER_PERMISSIONS = { publish = ">", subscribe = ">" }',
            text,
        )
        assert opened != text
        text = opened
    with accounts_server(tmp_path, text) as server:
        yield server


@contextlib.contextmanager
def accounts_server(tmp_path: Path, text: str | None = None) -> Iterator[EmbeddedServer]:
    """A nats-server that includes `text` (default: the shipped accounts file), its passwords
    from its environment; stopped on leaving."""
    (tmp_path / "accounts.conf").write_text(ACCOUNTS.read_text() if text is None else text)
    config = tmp_path / "auth.conf"
    config.write_text('include "accounts.conf"\n')
    server = EmbeddedServer(tmp_path / "store", config_file=config, env=server_env())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def as_user(base: Settings, server: EmbeddedServer, user: str) -> Settings:
    return base.with_(
        nats_url=[server.url],
        prefix="evalq",
        user=user,
        password=PASSWORDS[user],
        request_timeout=3.0,
        **ROLE_SETTINGS[user],
    )


class Violations:
    """Collects the permission errors the server reports on a connection."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.event = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        if "Permissions Violation" in str(exc) or "permissions violation" in str(exc).lower():
            self.seen.append(str(exc))
            self.event.set()

    async def wait(self, timeout: float = 5.0) -> str:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        return self.seen[-1]


@contextlib.asynccontextmanager
async def gateway_and_worker(base: Settings, server: EmbeddedServer) -> AsyncIterator[tuple[Any, Any]]:
    """A gateway and a worker (the stand-in evaluator), each as its own user of `server`;
    yields their connections, and stops both on leaving."""
    gateway_settings = as_user(base, server, "gateway")
    worker_settings = as_user(base, server, "worker").with_(evaluator=FAKE)
    gateway_nc = await connect(gateway_settings)
    gateway = await Gateway(gateway_nc, gateway_settings).start()
    worker_nc = await connect(worker_settings)
    worker = await Worker(worker_nc, worker_settings).start()
    running = asyncio.create_task(worker.run())
    try:
        yield gateway_nc, worker_nc
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
        await worker.stop()
        await worker_nc.close()
        await gateway.stop()
        await gateway_nc.close()


@pytest.fixture
async def deployment(auth_server: EmbeddedServer, settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """A gateway and a worker, each with its own user; the test acts as the submitter."""
    async with gateway_and_worker(settings, auth_server) as (gateway_nc, worker_nc):
        yield {"server": auth_server, "base": settings, "gateway_nc": gateway_nc, "worker_nc": worker_nc}


async def test_every_role_does_its_job(
    deployment: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitter = as_user(deployment["base"], deployment["server"], "submitter")
    async with AsyncClient(submitter) as client, AsyncClient(submitter) as follower:
        followed: list[Event] = []

        async def follow() -> None:
            # Started before the job exists: its events come live, with no consumer.
            async for event in follower.events(history=True):
                followed.append(event)
                if isinstance(event, Completed):
                    return

        following = asyncio.create_task(follow())
        accepted = await client.submit(**JOB)
        info = await client.wait_for_job(accepted.job_id, timeout=60)
        assert info.status == "completed"
        await asyncio.wait_for(following, 30)
        events = [e async for e in client.watch(accepted.job_id)]  # the history, read afterwards
        assert kinds(events) == kinds(followed) and kinds(events)[0] == "queued" and kinds(events)[-1] == "completed"
        files = await client.results(accepted.job_id, tmp_path)
        assert {f.name for f in files} == {"results.json", "eval.log"}
        # Counted from the gateway's history index, which follows the jobs bucket a moment behind.
        await eventually(client.queue, until=lambda q: q.completed_jobs == 1, timeout=10, what="the completed count")
        assert (await client.health()).workers
        # The history: the gateway follows the jobs bucket under its own user.
        await eventually(
            lambda: client.jobs(status="completed"),
            until=lambda page: page.jobs,
            timeout=10,
            what="the completed job in the history",
            interval=0.05,
        )
        assert await client.resolve(accepted.job_id[:8]) == accepted.job_id

        # A sharded job: the worker queues its pieces and merges them under its own user.
        sharded = await client.submit(**{**JOB, "limit": 6, "shards": 3})
        info = await client.wait_for_job(sharded.job_id, timeout=60)
        assert (info.status, info.shards_done) == ("completed", 3)

        # A sharded job cancelled with pieces waiting: the gateway takes them out of the
        # pieces stream under its own user, and the running one stops.
        with monkeypatch.context() as slow_evaluations:
            slow_evaluations.setenv("FAKE_EVAL_MODE", "slow")
            slow = await client.submit(**{**JOB, "limit": 6, "shards": 3})
            await eventually(
                lambda: client.get_job(slow.job_id),
                until=lambda info: any(p.status == "running" for p in info.pieces),
                timeout=30,
                what="a piece of the sharded job to start",
            )
            assert (await client.cancel_job(slow.job_id)).status == "cancelling"
            with pytest.raises(JobCancelled):
                await client.wait_for_job(slow.job_id, timeout=60)
        admin_js = deployment["gateway_nc"].jetstream()

        async def left() -> int:
            return (await admin_js.stream_info(Topology().pieces_stream("default"))).state.messages

        # The running piece's message goes when its worker, having stopped it, acks it: a
        # moment after the record says cancelled.
        await eventually(left, until=lambda n: n == 0, timeout=10, what="the cancelled job's pieces gone")

        # Cancel a job that waits in a pool with no worker yet.
        await Topology().ensure_pool(deployment["gateway_nc"].jetstream(), "held")
        held = await client.submit(**JOB, pool="held")
        assert (await client.cancel_job(held.job_id)).status == "cancelled"
        assert kinds([e async for e in client.watch(held.job_id)]) == ["queued", "cancelled"]
    admin = deployment["gateway_nc"].jetstream()
    # Following events made no consumer: the stream has the notifier's own only.
    consumers = await admin.consumers_info(Topology().events_stream)
    assert [c.name for c in consumers] == [Topology().notify_consumer]


async def test_results_of_many_chunks_come_through_the_submitters_account(
    deployment: dict[str, Any], tmp_path: Path
) -> None:
    job = str(uuid.uuid4())
    big = os.urandom(300_000)  # three chunks of the object store
    store = await deployment["worker_nc"].jetstream().object_store(Topology().results_bucket)
    await store.put(f"{job}/results.json", big)
    await store.put(f"{job}/eval.log", b"")
    # The gateway reads them for the submitter's team, whose job its record says it is.
    record = JobInfo(job_id=job, status="completed", created_at=now(), team="SUBMITTERS")
    await (await deployment["gateway_nc"].jetstream().key_value(Topology().jobs_bucket)).put(job, encode(record))
    submitter = as_user(deployment["base"], deployment["server"], "submitter")
    async with AsyncClient(submitter) as client:
        files = await client.results(job, tmp_path)
    assert [f.name for f in files] == ["eval.log", "results.json"]
    assert files[1].read_bytes() == big and files[0].read_bytes() == b""


async def test_a_submitter_reads_no_other_users_inbox(deployment: dict[str, Any], tmp_path: Path) -> None:
    base, server = deployment["base"], deployment["server"]
    violations = Violations()
    spy = await connect(as_user(base, server, "submitter"), error_cb=violations.on_error)
    caught: list[str] = []

    async def catch(msg: Any) -> None:
        caught.append(msg.subject)

    try:
        for subject in ("_INBOX.>", "_INBOX_gateway.>", "_INBOX_worker.>", "_R_.>", "$JS.API.>", ">"):
            await spy.subscribe(subject, cb=catch)
            assert f'subscription to "{subject.lower()}"' in (await violations.wait()).lower()
        # What it may read: its own role's inbox, and the events.
        await spy.subscribe("_INBOX_submitter.>", cb=catch)
        await spy.subscribe("evalq.events.>", cb=catch)
        await spy.flush()
        assert len(violations.seen) == 6

        busy = {role: deployment[f"{role}_nc"].stats["in_msgs"] for role in ("gateway", "worker")}
        # Another submitter's client, on an inbox prefix under its role's own.
        own = as_user(base, server, "submitter").with_(inbox_prefix="_INBOX_submitter.own")
        async with AsyncClient(own) as client:
            accepted = await client.submit(**JOB)
            await client.wait_for_job(accepted.job_id, timeout=60)
            await client.results(accepted.job_id, tmp_path)
        await spy.flush()
        # Meanwhile the gateway and the worker got their answers from JetStream and the
        # gateway, to their inboxes; none of it reached the spy.
        assert all(deployment[f"{role}_nc"].stats["in_msgs"] > busy[role] + 5 for role in busy)
        leaked = [subject for subject in caught if not subject.startswith(("_INBOX_submitter.own.", "evalq.events."))]
        assert leaked == []
        assert any(subject.startswith("_INBOX_submitter.own.") for subject in caught)  # the spy did listen
        assert len(violations.seen) == 6
    finally:
        await spy.close()


async def _attempt(nc: Any, subject: str, body: dict[str, Any]) -> str:
    """What a JetStream API request got: refused (no answer, nobody, an error) or accepted."""
    try:
        reply = await nc.request(subject, encode(body), timeout=2)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        return f"refused: {type(exc).__name__}"
    answer = json.loads(reply.data) if reply.data else {}
    return f"refused: {answer['error']}" if "error" in answer else f"ACCEPTED: {reply.data[:200]!r}"


@pytest.mark.parametrize("auth_server", [SHIPPED, ACCOUNT_ONLY], indirect=True)
async def test_a_submitter_creates_no_consumer_and_chooses_no_delivery_subject(deployment: dict[str, Any]) -> None:
    base, server = deployment["base"], deployment["server"]
    topology = Topology()
    admin = deployment["gateway_nc"].jetstream()
    async with AsyncClient(as_user(base, server, "submitter")) as client:
        job = (await client.submit(**JOB)).job_id
        await client.wait_for_job(job, timeout=60)
    work = topology.work_stream("default")
    stored = (await admin.stream_info(work)).state.messages
    targets = [
        f"$KV.{topology.jobs_bucket}.{job}",
        f"evalq.work.default.{uuid.uuid4()}",
        "evalq.submit",
        f"$JS.API.STREAM.DELETE.{work}",
    ]
    durable = {"durable_name": "spy", "deliver_policy": "all", "ack_policy": "none"}
    attempts: list[tuple[str, dict[str, Any]]] = []
    for api in ("$JS.evalq.API", "$JS.API"):
        for stream in (topology.events_stream, f"KV_{topology.jobs_bucket}", f"OBJ_{topology.results_bucket}"):
            attempts += [
                (f"{api}.CONSUMER.DURABLE.CREATE.{stream}.spy", {"stream_name": stream, "config": durable}),
                (f"{api}.CONSUMER.CREATE.{stream}.spy", {"stream_name": stream, "config": durable}),
                (f"{api}.CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": {"ack_policy": "none"}}),
            ]
        for target in targets:
            config = {"deliver_subject": target, "deliver_policy": "all", "ack_policy": "none"}
            attempts.append((f"{api}.CONSUMER.CREATE.{topology.events_stream}", {"config": config}))
    violations = Violations()
    nc = await connect(as_user(base, server, "submitter"), error_cb=violations.on_error)
    try:
        outcomes = await asyncio.gather(*(_attempt(nc, subject, body) for subject, body in attempts))
    finally:
        await nc.close()
    accepted = {
        subject: outcome for (subject, _), outcome in zip(attempts, outcomes, strict=True) if "ACCEPTED" in outcome
    }
    assert accepted == {}
    # The notifier's own only: none of the submitter's attempts made one.
    assert [c.name for c in await admin.consumers_info(topology.events_stream)] == [topology.notify_consumer]
    for stream in (f"KV_{topology.jobs_bucket}", f"OBJ_{topology.results_bucket}"):
        # Only the services' own: a worker watches a job's record through an ordered consumer.
        foreign = [
            consumer.name
            for consumer in await admin.consumers_info(stream)
            if consumer.config.durable_name
            or not (consumer.config.deliver_subject or "").startswith(("_INBOX_worker.", "_INBOX_gateway."))
        ]
        assert foreign == [], stream
    assert [c.name for c in await admin.consumers_info(work)] == [topology.consumer]
    assert (await admin.stream_info(work)).state.messages == stored  # still there, nothing added
    found = await JobStore(await admin.key_value(topology.jobs_bucket)).get(job)
    assert found is not None and found[0].status == "completed"


@pytest.mark.parametrize("auth_server", [SHIPPED, ACCOUNT_ONLY], indirect=True)
async def test_a_reply_subject_reaches_nothing_of_the_queue(deployment: dict[str, Any]) -> None:
    """Answers go where a request's reply subject says; a submitter's stay in its account."""
    base, server = deployment["base"], deployment["server"]
    topology = Topology()
    admin = deployment["gateway_nc"].jetstream()
    work = topology.work_stream("default")
    nc = await connect(as_user(base, server, "submitter"))
    try:
        job = str(uuid.uuid4())
        forged = [
            ("evalq.status", encode({"job_id": job}), f"evalq.work.default.{uuid.uuid4()}"),
            ("evalq.health", b"", f"$KV.{topology.jobs_bucket}.{job}"),
            ("evalq.queue", b"{}", f"$JS.API.STREAM.DELETE.{work}"),
            ("evalq.read", b'{"op": "last"}', f"evalq.work.default.{uuid.uuid4()}"),
            ("evalq.read", b'{"op": "events"}', f"$KV.{topology.jobs_bucket}.{job}"),
        ]
        # Answers aimed at the events: a submitter may read those subjects, so it sees each
        # answer land in its own account, and the events stream must not have stored it.
        aimed = [
            ("evalq.status", encode({"job_id": job}), topology.event_subject(job, "completed", team="SUBMITTERS")),
            ("evalq.health", b"", topology.event_subject(job, "failed", team="SUBMITTERS")),
            ("evalq.read", b'{"op": "last"}', topology.event_subject(job, "cancelled", team="SUBMITTERS")),
            ("evalq.read", b'{"op": "events"}', topology.event_subject(job, "started", team="SUBMITTERS")),
        ]
        landed = await nc.subscribe(topology.events_filter(job))
        for subject, body, reply in [*forged, *aimed]:
            await nc.publish(subject, body, reply=reply)
        subjects = sorted([(await landed.next_msg(timeout=10)).subject for _ in aimed])
        assert subjects == sorted(reply for _, _, reply in aimed)
    finally:
        await nc.close()
    events = await admin.stream_info(topology.events_stream, subjects_filter=topology.events_filter(job))
    assert not events.state.subjects
    assert (await admin.stream_info(work)).state.messages == 0
    assert await JobStore(await admin.key_value(topology.jobs_bucket)).get(job) is None


def test_the_deploy_files_give_each_role_the_inbox_its_user_may_read() -> None:
    accounts = ACCOUNTS.read_text()
    for values in ROLE_SETTINGS.values():
        assert f'"{values["inbox_prefix"]}.>"' in accounts
    assert '"_INBOX.>"' not in accounts
    compose = yaml.safe_load((REPO / "deploy" / "container" / "compose.yaml").read_text())["services"]
    for service, role in (("gateway-1", "gateway"), ("gateway-2", "gateway"), ("worker-gpu0", "worker")):
        environment = compose[service]["environment"]
        assert environment["EVALQ_USER"] == role
        assert environment["EVALQ_INBOX_PREFIX"] == ROLE_SETTINGS[role]["inbox_prefix"]
    for unit, role in (("evalq-gateway.service", "gateway"), ("evalq-worker@.service", "worker")):
        text = (REPO / "deploy" / "systemd" / unit).read_text()
        assert f"Environment=EVALQ_INBOX_PREFIX={ROLE_SETTINGS[role]['inbox_prefix']}\n" in text


async def test_anonymous_and_wrong_passwords_are_refused(auth_server: EmbeddedServer, settings: Settings) -> None:
    with pytest.raises(ConnectError):
        await connect(settings.with_(nats_url=[auth_server.url], connect_timeout=2))
    with pytest.raises(ConnectError):
        await connect(settings.with_(nats_url=[auth_server.url], user="submitter", password="wrong", connect_timeout=2))


async def test_submitter_cannot_pull_delete_forge_or_rewrite(deployment: dict[str, Any]) -> None:
    base, server = deployment["base"], deployment["server"]
    topology = Topology()
    # Queue a job that no worker can take yet: a pool whose worker has not started.
    gateway_nc = await connect(as_user(base, server, "gateway"))
    await topology.ensure_pool(gateway_nc.jetstream(), "held")
    submitter = as_user(base, server, "submitter")
    # A listed worker of the pool that never fetches: the job is admitted into the work
    # stream, and stays there.
    worker_nc = await connect(as_user(base, server, "worker"))
    idle = WorkerInfo(worker_id="w-held", host="h", pid=1, pool="held", ttl=120.0)
    await (await worker_nc.jetstream().key_value(topology.workers_bucket)).put(idle.worker_id, encode(idle))
    await worker_nc.close()
    async with AsyncClient(submitter) as client:
        job = (await client.submit(**JOB, pool="held")).job_id

        async def admitted() -> int:
            return (await gateway_nc.jetstream().stream_info(topology.work_stream("held"))).state.messages

        await eventually(admitted, until=lambda n: n == 1, what="the job admitted to the work stream", timeout=10)
        violations = Violations()
        nc = await connect(submitter, error_cb=violations.on_error)
        js = nc.jetstream(timeout=2)
        stream = topology.work_stream("held")

        # Pull work: the consumer's next-message API is not allowed.
        await nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{topology.consumer}", b'{"batch": 1}', reply=nc.new_inbox()
        )
        assert "publish" in (await violations.wait()).lower()
        # Delete a work message: the request is refused, so it never gets an answer.
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.APIError)):
            await js.delete_msg(stream, 1)
        # Forge a terminal event.
        await nc.publish(
            topology.event_subject(job, "completed", team="SUBMITTERS"),
            encode({"type": "completed", "job_id": job, "time": "x"}),
        )
        await violations.wait()
        # Rewrite the job's record.
        await nc.publish(f"$KV.{topology.jobs_bucket}.{job}", b'{"status": "completed"}')
        await violations.wait()
        # Enqueue around the gateway.
        await nc.publish(topology.work_subject("held", "forged"), b"{}")
        await violations.wait()
        await nc.close()

        info = await client.get_job(job)
        assert info.status == "queued"
        admin = gateway_nc.jetstream()
        state = (await admin.stream_info(stream)).state
        assert state.messages == 1
        consumer = await admin.consumer_info(stream, topology.consumer)
        assert consumer.num_ack_pending == 0 and consumer.delivered.stream_seq == 0
        with pytest.raises(nats.js.errors.NotFoundError):
            await admin.get_last_msg(
                topology.events_stream, topology.event_subject(job, "completed", team="SUBMITTERS")
            )
        jobs = JobStore(await admin.key_value(topology.jobs_bucket))
        found = await jobs.get(job)
        assert found is not None and found[0].status == "queued"
    await gateway_nc.close()


async def test_worker_cannot_submit(deployment: dict[str, Any]) -> None:
    base, server = deployment["base"], deployment["server"]
    violations = Violations()
    nc = await connect(as_user(base, server, "worker"), error_cb=violations.on_error)
    try:
        await nc.publish("evalq.submit", encode(JOB), reply=nc.new_inbox())
        assert "evalq.submit" in (await violations.wait()).lower()
        await nc.publish("evalq.work.default.forged", encode(JOB))
        assert "evalq.work.default.forged" in (await violations.wait()).lower()
        info = await nc.jetstream().stream_info(Topology().work_stream("default"))
        assert info.state.messages == 0
    finally:
        await nc.close()


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate; never committed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    paths: dict[str, Path] = {}

    def write(name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_cert"] = folder / f"{name}.pem"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evalq test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)
    import ipaddress

    for name, usage in (
        ("server", x509.ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", x509.ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"evalq {name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if name == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        write(name, key, builder.sign(ca_key, hashes.SHA256()))
    return paths


async def test_tls_with_client_certificates(tmp_path: Path, settings: Settings) -> None:
    certs = make_certs(tmp_path)
    shutil.copy(ACCOUNTS, tmp_path / "accounts.conf")
    config = tmp_path / "tls.conf"
    config.write_text(
        'include "accounts.conf"\n'
        f'tls {{\n  cert_file: "{certs["server_cert"]}"\n  key_file: "{certs["server_key"]}"\n'
        f'  ca_file: "{certs["ca_cert"]}"\n  verify: true\n}}\n'
    )
    server = EmbeddedServer(tmp_path / "store", config_file=config, env=server_env())
    server.start()
    try:
        tls = {
            "tls_ca": str(certs["ca_cert"]),
            "tls_cert": str(certs["client_cert"]),
            "tls_key": str(certs["client_key"]),
        }
        url = f"tls://127.0.0.1:{server.port}"
        gateway_settings = as_user(settings, server, "gateway").with_(nats_url=[url], **tls)
        gateway_nc = await connect(gateway_settings)
        async with Gateway(gateway_nc, gateway_settings):
            async with AsyncClient(as_user(settings, server, "submitter").with_(nats_url=[url], **tls)) as client:
                assert (await client.submit(**JOB)).status == "queued"
            with pytest.raises(ConnectError):  # a password but no client certificate
                await connect(
                    as_user(settings, server, "submitter").with_(
                        nats_url=[url], tls_ca=tls["tls_ca"], connect_timeout=2
                    )
                )
        await gateway_nc.close()
    finally:
        server.stop()
