"""Raw JetStream requests: durable writes, API reads, the API prefix and the one error mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
    ServerError,
    ServiceUnavailableError,
)

from evalq import jetstream
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.jetstream import ErrorBody, Pipeline, PubAck, Write
from evalq.topology import Topology


@pytest.fixture
async def stream(nc: Any, settings: Any) -> str:
    name = f"{settings.queue.prefix}_W"
    await nc.jetstream().add_stream(name=name, subjects=[f"{settings.queue.prefix}.w.>"])
    await nc.jetstream().create_key_value(bucket=f"{settings.queue.prefix}-kv")
    return name


async def test_publish_returns_the_stream_ack_and_raises_its_errors(nc: Any, settings: Any, stream: str) -> None:
    subject = f"{settings.queue.prefix}.w.one"
    once = Write(subject, b"a", {"Nats-Msg-Id": "x"}, stream=stream)
    first = await jetstream.publish(nc, once, timeout=5)
    again = await jetstream.publish(nc, once, timeout=5)
    assert first.stream == stream and first.seq == 1 and not first.duplicate
    assert again.seq == 1 and again.duplicate
    with pytest.raises(APIError) as wrong_stream:
        await jetstream.publish(nc, Write(subject, b"a", stream="ELSEWHERE"), timeout=5)
    assert wrong_stream.value.err_code == 10060
    with pytest.raises(NoStreamResponseError):
        await jetstream.publish(nc, Write(f"{settings.queue.prefix}.nowhere", b"a"), timeout=5)
    bucket = f"{settings.queue.prefix}-kv"
    assert await jetstream.create_key(nc, bucket, "k", b"1", timeout=5) >= 1
    with pytest.raises(KeyWrongLastSequenceError):
        await jetstream.create_key(nc, bucket, "k", b"2", timeout=5)
    assert (await (await nc.jetstream().key_value(bucket)).get("k")).value == b"1"


async def test_a_pipeline_sends_before_it_waits_and_reports_each_outcome(nc: Any, settings: Any, stream: str) -> None:
    pipeline = Pipeline(nc)
    bucket = f"{settings.queue.prefix}-kv"
    await jetstream.create_key(nc, bucket, "taken", b"0", timeout=5)
    silent = f"{settings.queue.prefix}.silent"

    async def ignore(msg: Any) -> None:
        """Listens, never answers."""

    await nc.subscribe(silent, cb=ignore)
    sent = [
        await pipeline.send(Write(f"{settings.queue.prefix}.w.a", b"1", stream=stream)),
        await pipeline.send(Write(f"{settings.queue.prefix}.w.b", b"2", stream=stream)),
        await pipeline.send(jetstream.key_create(bucket, "taken", b"1")),
        await pipeline.send(jetstream.key_create(bucket, "fresh", b"1")),
        await pipeline.send(Write(f"{settings.queue.prefix}.nowhere", b"x")),
        await pipeline.send(Write(silent, b"x")),
    ]
    outcomes = await pipeline.wait(sent, timeout=1.0)
    first, second, taken, fresh, nowhere, silence = outcomes
    assert isinstance(first, PubAck) and isinstance(second, PubAck) and second.seq == first.seq + 1
    assert isinstance(taken, KeyWrongLastSequenceError)
    assert isinstance(fresh, PubAck) and fresh.seq > 0
    assert isinstance(nowhere, NoStreamResponseError)
    assert isinstance(silence, NatsTimeout)
    assert not pipeline._waiting, "a write that timed out is forgotten"


def test_the_api_prefix_follows_the_domain() -> None:
    assert jetstream.api_prefix() == jetstream.api_prefix(None) == jetstream.api_prefix("") == "$JS.API"
    assert jetstream.api_prefix("hub") == "$JS.hub.API"


async def test_api_objects_carry_the_domain_of_their_settings_or_context(nc: Any) -> None:
    assert jetstream.Api.of(nc).prefix == "$JS.API"
    built = jetstream.Api.of(nc, domain="hub", timeout=2.5)
    assert (built.nc, built.prefix, built.timeout) == (nc, "$JS.hub.API", 2.5)
    taken = jetstream.Api.of_context(nc.jetstream(domain="hub", timeout=1.5))
    assert (taken.nc, taken.prefix, taken.timeout) == (nc, "$JS.hub.API", 1.5)
    assert jetstream.Api.of_context(nc.jetstream()).prefix == "$JS.API"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (ErrorBody(400, 10058, "stream name already in use"), BadRequestError),
        (ErrorBody(404, 10059, "stream not found"), NotFoundError),
        (ErrorBody(404, 10014, "consumer not found"), NotFoundError),
        (ErrorBody(500, 10049, "insufficient resources"), ServerError),
        (ErrorBody(503, 10008, "JetStream temporarily unavailable"), ServiceUnavailableError),
        (ErrorBody(409, 10148, "some other code"), APIError),
        (ErrorBody(400, 10071, "wrong last sequence: 3"), KeyWrongLastSequenceError),
        (ErrorBody(400, 10164, "wrong last sequence"), KeyWrongLastSequenceError),
    ],
)
def test_one_mapping_from_an_error_body_to_an_exception(body: ErrorBody, expected: type[APIError]) -> None:
    error = jetstream.api_error(body)
    assert type(error) is expected
    # Every one carries the codes, the compare-and-set error too (nats-py's own leaves them unset).
    assert (error.code, error.err_code, error.description) == (body.code, body.err_code, body.description)


async def test_reads_decode_the_stream_and_raise_mapped_errors(nc: Any, settings: Any, stream: str) -> None:
    api = jetstream.Api.of(nc, timeout=5)
    for index in range(4):
        await jetstream.publish(nc, Write(f"{settings.queue.prefix}.w.{index}", b"x", stream=stream), timeout=5)
    await nc.jetstream().delete_msg(stream, 2)
    info = await jetstream.stream_info(api, stream, deleted_details=True)
    assert (info.state.first_seq, info.state.messages, info.state.deleted) == (1, 3, [2])
    assert (await jetstream.stream_info(api, stream)).state.deleted is None

    await nc.jetstream().add_consumer(stream, durable_name="reader")
    assert (await jetstream.consumer_info(api, stream, "reader")).num_ack_pending == 0
    with pytest.raises(NotFoundError) as no_consumer:
        await jetstream.consumer_info(api, stream, "nobody")
    assert no_consumer.value.err_code == 10014

    subjects = []
    seq = 1
    while (stored := await jetstream.msg_get_next(api, stream, seq, f"{settings.queue.prefix}.w.>")) is not None:
        subjects.append(stored.subject)
        seq = stored.seq + 1
    assert subjects == [f"{settings.queue.prefix}.w.{index}" for index in (0, 2, 3)]
    with pytest.raises(NotFoundError) as no_stream:  # a missing stream is an error, not the end of a scan
        await jetstream.msg_get_next(api, f"{stream}_GONE", 1, ">")
    assert no_stream.value.err_code == 10059

    await nc.jetstream().add_stream(name=f"{stream}_OTHER", subjects=[f"{settings.queue.prefix}.other.>"])
    assert await jetstream.stream_names(api, subject=f"{settings.queue.prefix}.w.>") == [stream]
    assert {stream, f"{stream}_OTHER"} <= set(await jetstream.stream_names(api))


async def test_requests_go_to_the_configured_domain(tmp_path: Path) -> None:
    config = tmp_path / "domain.conf"
    config.write_text("jetstream { domain: hub }\n")
    async with EmbeddedServer(tmp_path / "store", config_file=config) as server:
        settings = Settings.of(nats_url=[server.url], prefix="dom", js_domain="hub", request_timeout=2.0)
        nc = await connect(settings)
        try:
            topology = Topology.from_settings(settings)
            js = nc.jetstream(domain=settings.connection.js_domain)
            await topology.ensure(js, timeout=10)
            assert await topology.pools(js) == ["default"]
            assert await topology.has_pool(js, "default") and not await topology.has_pool(js, "other")
            hub = jetstream.Api.of(nc, domain=settings.connection.js_domain, timeout=2.0)
            assert (await jetstream.stream_info(hub, topology.work_stream("default"))).state.messages == 0
            with pytest.raises(ServiceUnavailableError, match="domain"):
                await jetstream.stream_info(jetstream.Api.of(nc, domain="elsewhere", timeout=2.0), "ANY")
            with pytest.raises(ServiceUnavailableError):
                await topology.pools(nc.jetstream(domain="elsewhere", timeout=2.0))
        finally:
            await nc.close()


def test_key_writes_name_their_bucket_and_ttl() -> None:
    put = jetstream.key_put("b-workers", "w1", b"{}", ttl=2.5)
    assert (put.subject, put.headers) == ("$KV.b-workers.w1", {"Nats-TTL": "3s"})
    assert jetstream.key_put("b", "k", b"", ttl=0.2).headers == {"Nats-TTL": "1s"}
    assert jetstream.key_put("b", "k", b"").headers is None
    assert jetstream.key_delete("b", "k").headers == {"KV-Operation": "DEL"}


def test_a_delete_marker_can_expire() -> None:
    assert jetstream.key_delete("b", "k", ttl=3).headers == {"KV-Operation": "DEL", "Nats-TTL": "3s"}
