"""Authentication and least privilege with deploy/nats/accounts.conf, and a TLS variant.

Each test runs its own nats-server with the committed accounts file (default prefix
`evalq`); passwords come from the server's environment, certificates are made here.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.errors import ConnectError
from evalq.gateway import Gateway
from evalq.jobstore import JobStore
from evalq.schemas import encode
from evalq.topology import Topology
from evalq.worker import Worker

from .conftest import REPO
from .jobs import FAKE
from .jobs import JOB as BASE_JOB

ACCOUNTS = REPO / "deploy" / "nats" / "accounts.conf"
PASSWORDS = {"submitter": "s3cret-sub", "gateway": "s3cret-gw", "worker": "s3cret-wk"}
JOB = {**BASE_JOB, "limit": 2}


def server_env() -> dict[str, str]:
    return {**os.environ, **{f"EVALQ_{user.upper()}_PASSWORD": pw for user, pw in PASSWORDS.items()}}


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    shutil.copy(ACCOUNTS, tmp_path / "accounts.conf")  # includes resolve beside the including file
    config = tmp_path / "auth.conf"
    config.write_text('include "accounts.conf"\n')
    server = EmbeddedServer(tmp_path / "store", config_file=config, env=server_env())
    server.start()
    yield server
    server.stop()


def as_user(base: Settings, server: EmbeddedServer, user: str) -> Settings:
    return base.with_(nats_url=[server.url], prefix="evalq", user=user, password=PASSWORDS[user], request_timeout=3.0)


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


@pytest.fixture
async def deployment(auth_server: EmbeddedServer, settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """A gateway and a worker, each with its own user; the test acts as the submitter."""
    gateway_settings = as_user(settings, auth_server, "gateway")
    worker_settings = as_user(settings, auth_server, "worker").with_(evaluator=FAKE)
    gateway_nc = await connect(gateway_settings)
    gateway = await Gateway(gateway_nc, gateway_settings).start()
    worker_nc = await connect(worker_settings)
    worker = await Worker(worker_nc, worker_settings).start()
    running = asyncio.create_task(worker.run())
    yield {"server": auth_server, "base": settings}
    worker.request_stop()
    await asyncio.wait_for(running, 30)
    await worker.stop()
    await worker_nc.close()
    await gateway.stop()
    await gateway_nc.close()


async def test_every_role_does_its_job(deployment: dict[str, Any], tmp_path: Path) -> None:
    submitter = as_user(deployment["base"], deployment["server"], "submitter")
    async with AsyncClient(submitter) as client:
        accepted = await client.submit(**JOB)
        info = await client.wait_for_job(accepted.job_id, timeout=60)
        assert info.status == "completed"
        events = [e async for e in client.watch(accepted.job_id)]
        assert events[-1].job_id == accepted.job_id
        files = await client.results(accepted.job_id, tmp_path)
        assert {f.name for f in files} == {"results.json", "eval.log"}
        assert (await client.queue()).completed_jobs == 1
        assert (await client.health()).workers


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
    async with AsyncClient(submitter) as client:
        job = (await client.submit(**JOB, pool="held")).job_id
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
            topology.event_subject(job, "completed"), encode({"type": "completed", "job_id": job, "time": "x"})
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
            await admin.get_last_msg(topology.events_stream, topology.event_subject(job, "completed"))
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
