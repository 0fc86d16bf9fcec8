"""The SDK raises evalq's errors and never nats-py's, whatever is missing on the other side.

Each public method of `AsyncClient` and `Client` is called against no server at all, a closed
connection, a server with no gateway, a gateway that never answers, and an unknown job id;
each must raise exactly the evalq error that fits. The calls of one case run together, so
the short request timeouts add up once per case, not once per method. The last tests are the
gateway's side: a lost compare-and-set answers 409, a missing JetStream object 503.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js.errors import KeyWrongLastSequenceError

from evalq import (
    AsyncClient,
    Client,
    Conflict,
    ConnectError,
    EvalqError,
    JobNotFound,
    RequestError,
    Timeout,
    Unavailable,
    WrongState,
    jetstream,
)
from evalq.config import Settings
from evalq.connection import connect
from evalq.gateway import Gateway
from evalq.gateway.refusals import as_request_error
from evalq.topology import Topology

UNKNOWN = "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e"
JOB = {"model": "dummy", "tasks": ["evalq_demo"]}
BOUND = 30.0  # no case may take longer than this, whatever goes wrong


async def _first(events: AsyncIterator[Any]) -> Any:
    async for event in events:
        return event
    return None


AsyncCall = Callable[[AsyncClient, str, Path], Awaitable[Any]]
SyncCall = Callable[[Client, str, Path], Any]

# Every public method but `is_healthy` (which answers False instead of raising) and the
# lifecycle ones (connect, close), each called as a user would.
# The same call on either client: the async one returns an awaitable, the blocking one the value.
_BOTH: dict[str, Callable[[Any, str, Path], Any]] = {
    "submit": lambda c, job, dest: c.submit(**JOB, retries=0),
    "evaluate": lambda c, job, dest: c.evaluate("dummy", ["evalq_demo"], retries=0),
    "submit_and_wait": lambda c, job, dest: c.submit_and_wait(timeout=5, **JOB, retries=0),
    "get_job": lambda c, job, dest: c.get_job(job),
    "cancel_job": lambda c, job, dest: c.cancel_job(job),
    "wait_for_job": lambda c, job, dest: c.wait_for_job(job, timeout=5),
    "queue": lambda c, job, dest: c.queue(),
    "get_queue_status": lambda c, job, dest: c.get_queue_status(),
    "health": lambda c, job, dest: c.health(),
    "list_tasks": lambda c, job, dest: c.list_tasks(),
    "list_models": lambda c, job, dest: c.list_models(),
    "results": lambda c, job, dest: c.results(job, dest),
}
ASYNC_CALLS: dict[str, AsyncCall] = {
    **_BOTH,
    "watch": lambda c, job, dest: _first(c.watch(job)),
    "events": lambda c, job, dest: _first(c.events(job, history=True)),
}
SYNC_CALLS: dict[str, SyncCall] = {
    **_BOTH,
    "watch": lambda c, job, dest: next(iter(c.watch(job)), None),
    "events": lambda c, job, dest: next(iter(c.events(job, history=True)), None),
}
GATEWAY_METHODS = {
    "submit",
    "evaluate",
    "submit_and_wait",
    "get_job",
    "cancel_job",
    "wait_for_job",
    "queue",
    "get_queue_status",
    "health",
    "list_tasks",
    "list_models",
}
JOB_METHODS = ("get_job", "cancel_job", "wait_for_job", "results", "watch")


async def call_async(client: AsyncClient, names: Any, dest: Path, job: str = UNKNOWN) -> dict[str, Any]:
    """Each named method's outcome (its result or what it raised), all called at once."""
    names = list(names)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(ASYNC_CALLS[name](client, job, dest) for name in names), return_exceptions=True), BOUND
    )
    return dict(zip(names, outcomes, strict=True))


async def call_sync(client: Client, names: Any, dest: Path, job: str = UNKNOWN) -> dict[str, Any]:
    """The same for the blocking client, each call on its own thread."""
    names = list(names)
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(asyncio.to_thread(SYNC_CALLS[name], client, job, dest) for name in names), return_exceptions=True
        ),
        BOUND,
    )
    return dict(zip(names, outcomes, strict=True))


def assert_raised(outcomes: dict[str, Any], expected: type[EvalqError], says: str = "") -> None:
    wrong = {name: repr(outcome) for name, outcome in outcomes.items() if type(outcome) is not expected}
    assert not wrong, f"expected {expected.__name__} from every call; got {wrong}"
    for name, outcome in outcomes.items():
        assert not isinstance(outcome, nats.errors.Error)
        assert says in str(outcome), f"{name}: {outcome}"


@pytest.fixture
def quick(settings: Settings) -> Settings:
    return settings.with_(request_timeout=0.5, connect_timeout=0.5)


@pytest.fixture
def nowhere(quick: Settings) -> Settings:
    """Settings that point at a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return quick.with_(nats_url=[f"nats://127.0.0.1:{port}"])


@pytest.fixture
async def silent_gateway(nc: Any, topology: Topology) -> AsyncIterator[None]:
    """Something that takes every gateway request and never answers (a hung gateway)."""

    async def ignore(msg: Any) -> None:
        """Takes the request, sends nothing back."""

    subscription = await nc.subscribe(topology.subject("*"), cb=ignore)
    await nc.flush(timeout=5)
    yield
    await subscription.unsubscribe()


# --- (a) no server ---------------------------------------------------------------------------


async def test_no_server_is_a_connect_error_with_a_hint(nowhere: Settings, tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="evalq up") as connecting:
        await asyncio.wait_for(AsyncClient(nowhere).connect(), BOUND)
    assert type(connecting.value) is ConnectError
    with pytest.raises(ConnectError):
        async with AsyncClient(nowhere):
            pass
    with pytest.raises(ConnectError, match="evalq up"):
        await asyncio.wait_for(asyncio.to_thread(Client, nowhere), BOUND)

    never_connected = AsyncClient(nowhere)
    assert_raised(await call_async(never_connected, ASYNC_CALLS, tmp_path), ConnectError, "not connected")
    assert await never_connected.is_healthy() is False
    await never_connected.close()  # nothing to close: no error either


async def test_a_closed_connection_is_a_connect_error(quick: Settings, tmp_path: Path) -> None:
    closed = await connect(quick)
    await closed.close()
    client = AsyncClient(quick, nc=closed)
    assert_raised(await call_async(client, ASYNC_CALLS, tmp_path), ConnectError, "no connection to NATS")
    assert await client.is_healthy() is False

    blocking = await asyncio.to_thread(Client, quick)
    await asyncio.to_thread(blocking.close)
    assert_raised(await call_sync(blocking, SYNC_CALLS, tmp_path), ConnectError, "closed")
    with pytest.raises(ConnectError, match="closed"):
        blocking.is_healthy()


# --- (b) a server, no gateway ------------------------------------------------------------------


async def test_no_gateway_and_no_queue_is_unavailable(quick: Settings, tmp_path: Path) -> None:
    async with AsyncClient(quick) as client:
        outcomes = await call_async(client, ASYNC_CALLS, tmp_path)
        assert await client.is_healthy() is False
    # Every call asks the gateway: stored events and results are read through it too.
    assert set(outcomes) == {*GATEWAY_METHODS, "watch", "events", "results"}
    assert_raised(outcomes, Unavailable, "start one with `evalq gateway`")

    with Client(quick) as blocking:
        outcomes = await call_sync(blocking, SYNC_CALLS, tmp_path)
        assert blocking.is_healthy() is False
    assert_raised(outcomes, Unavailable, "evalq gateway")


async def test_no_gateway_over_an_existing_queue_is_unavailable(
    quick: Settings, topology: Topology, tmp_path: Path
) -> None:
    names = [*GATEWAY_METHODS, "results", "watch"]  # not `events`: it waits for events, as it should
    async with AsyncClient(quick) as client:
        assert_raised(await call_async(client, names, tmp_path), Unavailable, "start one with `evalq gateway`")
    with Client(quick) as blocking:
        assert_raised(await call_sync(blocking, names, tmp_path), Unavailable, "start one with `evalq gateway`")


async def test_a_gateway_that_never_answers_is_a_timeout(quick: Settings, silent_gateway: None, tmp_path: Path) -> None:
    names = [*GATEWAY_METHODS, "results", "watch"]
    async with AsyncClient(quick) as client:
        outcomes = await call_async(client, names, tmp_path)
        assert await client.is_healthy() is False
    assert_raised(outcomes, Timeout, "within 0.5s")
    assert all(isinstance(outcome, TimeoutError) for outcome in outcomes.values())
    with Client(quick) as blocking:
        assert_raised(await call_sync(blocking, names, tmp_path), Timeout, "EVALQ_REQUEST_TIMEOUT")


# --- (c) an unknown job ---------------------------------------------------------------------------


async def test_an_unknown_job_is_job_not_found(settings: Settings, gateway: Gateway, tmp_path: Path) -> None:
    prompt = settings.with_(request_timeout=5.0, connect_timeout=0.5)  # answers come; nothing waits it out
    async with AsyncClient(prompt) as client:
        outcomes = await call_async(client, JOB_METHODS, tmp_path)
        assert (await client.queue()).queued_jobs == {"default": []}  # the gateway itself is fine
    assert_raised(outcomes, JobNotFound, UNKNOWN)
    assert all(outcome.code == 404 for outcome in outcomes.values())
    with Client(prompt) as blocking:
        assert_raised(await call_sync(blocking, JOB_METHODS, tmp_path), JobNotFound, UNKNOWN)
    assert not (tmp_path / UNKNOWN).exists()


async def test_a_timed_out_wait_is_a_timeout_that_names_the_job(client: AsyncClient) -> None:
    accepted = await client.submit(**JOB)  # no worker: it stays queued
    with pytest.raises(Timeout, match=accepted.job_id) as waited:
        await client.wait_for_job(accepted.job_id, timeout=0.2)
    assert type(waited.value) is Timeout and isinstance(waited.value, TimeoutError)
    assert (await client.get_job(accepted.job_id)).status == "queued"


# --- the gateway's side -----------------------------------------------------------------------------


def test_a_lost_compare_and_set_is_409_not_500() -> None:
    reply = as_request_error(Conflict("job x changed 5 times while cancelling"))
    assert type(reply) is WrongState and reply.code == 409
    assert "changed 5 times" in reply.message
    # And the SDK turns that reply back into the same class.
    assert type(RequestError.for_code(reply.code, reply.message)) is WrongState


def test_a_key_value_conflict_without_codes_does_not_break_the_boundary() -> None:
    # nats-py's own key-value conflict sets no err_code; the boundary must still answer.
    reply = as_request_error(KeyWrongLastSequenceError(description="wrong last sequence: 4"))
    assert type(reply) is RequestError and reply.code == 500


def test_a_missing_jetstream_object_is_503_not_500() -> None:
    reply = as_request_error(jetstream.api_error(jetstream.ErrorBody(404, 10014, "consumer not found")))
    assert type(reply) is Unavailable and reply.code == 503 and "consumer not found" in reply.message


async def test_positions_come_from_the_schedulers_plan_not_the_consumer(
    nc: Any, client: AsyncClient, topology: Topology
) -> None:
    first = await client.submit(**JOB)
    second = await client.submit(**JOB)
    assert (await client.get_job(second.job_id)).position_in_queue == 1
    # Waiting jobs are records: the work stream's consumer plays no part in their order.
    await nc.jetstream().delete_consumer(topology.work_stream("default"), topology.consumer)
    assert [(await client.get_job(j.job_id)).position_in_queue for j in (first, second)] == [0, 1]
    assert (await client.queue()).queued_jobs["default"] == [first.job_id, second.job_id]
