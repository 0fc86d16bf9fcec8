"""Webhooks end to end: a receiver on loopback that is down for the first 20 s gets every
notification once it is up, signed, across a gateway restart; one that never answers
delays no job, and its deliveries show up as failures that can be retried."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.errors import InvalidField
from evalq.gateway import Gateway
from evalq.gateway.notifier import matches
from evalq.schemas import Completed, Gated, Subscription, Verdict, decode_event
from evalq.topology import Topology
from evalq.webhooks import SIGNATURE_HEADER, check_url, verify

from .jobs import FAKE, JOB
from .test_embedded import free_port
from .waiting import eventually

pytestmark = pytest.mark.slow


@dataclass
class Receiver:
    """A webhook receiver on loopback: records each POST (headers, body) and answers 200,
    or (`silent`) reads it and never answers."""

    port: int
    silent: bool = False
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")[1:]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if self.silent:
                await asyncio.sleep(3600)  # cancelled when the server closes
                return
            self.got.append((headers, body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        try:
            yield self
        finally:
            server.close()
            for task in [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("Receiver.handle")]:  # type: ignore[union-attr]
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    def by_key(self) -> dict[str, list[bytes]]:
        found: dict[str, list[bytes]] = {}
        for headers, body in self.got:
            found.setdefault(headers["idempotency-key"], []).append(body)
        return found


async def test_a_receiver_down_for_20s_gets_each_notification_signed_across_a_restart(
    nc: Any, settings: Settings, topology: Topology, gateway: Gateway, worker_factory: Any
) -> None:
    receiver = Receiver(free_port())
    async with AsyncClient(settings) as client:
        added = await client.notify.add("ci", f"http://127.0.0.1:{receiver.port}/hook", on=["completed", "failed"])
        assert added.secret and [s.name for s in await client.notify.subscriptions()] == ["ci"]
        began = time.monotonic()
        await worker_factory(evaluator=FAKE)
        first = [(await client.submit(**JOB, labels={"n": str(i)})).job_id for i in range(2)]
        for job_id in first:
            await client.wait_for_job(job_id, timeout=60)
        # The gateway restarts while the receiver is still down; what it had queued waits.
        await gateway.stop()
        async with Gateway(nc, settings, topology):
            later = (await client.submit(**JOB, labels={"n": "2"})).job_id
            await client.wait_for_job(later, timeout=60)
            expected = {f"{job_id}.completed" for job_id in [*first, later]}
            assert time.monotonic() - began < 20, "the jobs took the whole outage: the test proves nothing"
            assert receiver.connections == 0
            await eventually(lambda: time.monotonic() - began >= 20, what="the receiver's 20 s outage", timeout=30)
            async with receiver.serving():
                await eventually(
                    receiver.by_key, until=lambda got: set(got) >= expected, what="every notification", timeout=90
                )
    got = receiver.by_key()
    assert set(got) == expected
    for key, bodies in got.items():
        assert len(set(bodies)) == 1, f"{key}: differing bodies"
        event = decode_event(bodies[0])
        assert isinstance(event, Completed) and f"{event.job_id}.completed" == key
    for headers, body in receiver.got:
        assert verify(added.secret or "", body, headers[SIGNATURE_HEADER.lower()]), "a bad signature"
        assert headers["x-evalq-event"] == "completed" and headers["x-evalq-subscription"] == "ci"


async def test_a_receiver_that_never_answers_delays_no_job_and_its_deliveries_fail(
    nc: Any, settings: Settings, topology: Topology, worker_factory: Any
) -> None:
    quick = settings.with_(notify_timeout=1.0, notify_attempts=2)
    receiver = Receiver(free_port(), silent=True)
    async with receiver.serving(), Gateway(nc, quick, topology), AsyncClient(settings) as client:
        await client.notify.add("slow", f"http://127.0.0.1:{receiver.port}/", on=["completed"])
        await worker_factory(evaluator=FAKE)
        began = time.monotonic()
        ids = [(await client.submit(**JOB)).job_id for _ in range(4)]
        for job_id in ids:
            await client.wait_for_job(job_id, timeout=60)
        # A fake evaluation takes well under a second; a job held up by a delivery would
        # wait its 1 s timeouts one after another.
        assert time.monotonic() - began < 15
        failures = await eventually(
            client.notify.failures, until=lambda fs: len(fs) == len(ids), what="every delivery failed", timeout=60
        )
        assert {f.id for f in failures} == {f"{i}.completed" for i in ids}
        assert all(f.attempts == 2 and "Timeout" in f.error and f.subscription == "slow" for f in failures)
        assert await client.notify.retry(failures[0].id) == 1
        assert len(await client.notify.failures()) == len(ids) - 1
        with pytest.raises(InvalidField) as unknown:
            await client.notify.retry("nope")
        assert unknown.value.path == "$.id"


async def test_subscriptions_refuse_bad_input_and_hosts_outside_loopback(client: AsyncClient) -> None:
    with pytest.raises(InvalidField) as far:
        await client.notify.add("x", "http://example.com/hook")
    assert far.value.path == "$.url" and "webhook_hosts" in far.value.message
    with pytest.raises(InvalidField) as bad_on:
        await client.notify.add("x", "http://127.0.0.1:1/", on=["sometimes"])
    assert bad_on.value.path == "$.on[0]"
    with pytest.raises(InvalidField) as short:
        await client.notify.add("x", "http://127.0.0.1:1/", secret="short")
    assert short.value.path == "$.secret"
    with pytest.raises(InvalidField) as missing:
        await client.notify.remove("absent")
    assert missing.value.path == "$.name"
    assert await client.notify.subscriptions() == []


def test_urls_outside_loopback_are_an_admins_and_only_to_allowed_hosts() -> None:
    check_url("http://127.0.0.1:9/x", allowed_hosts=[], admin=False)
    check_url("http://[::1]:9/x", allowed_hosts=[], admin=False)
    check_url("https://hooks.example.com/x", allowed_hosts=["hooks.example.com"], admin=True)
    with pytest.raises(InvalidField, match="only an admin"):
        check_url("https://hooks.example.com/x", allowed_hosts=["hooks.example.com"], admin=False)
    with pytest.raises(InvalidField, match="webhook_hosts"):
        check_url("https://other.example.com/x", allowed_hosts=["hooks.example.com"], admin=True)
    for broken in ("http://localhost:99999/", "http://[::1/x", "http://127.0.0.1:port/"):
        with pytest.raises(InvalidField, match="valid host and port"):
            check_url(broken, allowed_hosts=[], admin=True)
    assert not verify("s" * 16, b"{}", "sha256=\u00e9")  # a header that is not ASCII is no signature


def test_a_subscription_matches_its_kinds_and_labels() -> None:
    sub = Subscription(name="s", team="t", url="http://127.0.0.1/", on=["no-go"], labels={"run": "r1"}, secret="x" * 16)
    verdict = Verdict(verdict="NO-GO", policy="p")
    gated = Gated(job_id="j", time="t", labels={"run": "r1", "step": "1"}, verdict=verdict)
    assert matches(sub, gated)
    assert not matches(
        sub, Gated(job_id="j", time="t", labels={"run": "r1"}, verdict=Verdict(verdict="GO", policy="p"))
    )
    assert not matches(sub, Gated(job_id="j", time="t", labels={"run": "r2"}, verdict=verdict))
    assert not matches(sub, Completed(job_id="j", time="t", labels={"run": "r1"}))
