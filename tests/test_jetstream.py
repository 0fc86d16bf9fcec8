"""Durable writes: single publishes and pipelined ones, against a real nats-server."""

from __future__ import annotations

from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, KeyWrongLastSequenceError, NoStreamResponseError

from evalq import jetstream
from evalq.jetstream import Pipeline, PubAck, Write


@pytest.fixture
async def stream(nc: Any, settings: Any) -> str:
    name = f"{settings.prefix}_W"
    await nc.jetstream().add_stream(name=name, subjects=[f"{settings.prefix}.w.>"])
    await nc.jetstream().create_key_value(bucket=f"{settings.prefix}-kv")
    return name


async def test_publish_returns_the_stream_ack_and_raises_its_errors(nc: Any, settings: Any, stream: str) -> None:
    subject = f"{settings.prefix}.w.one"
    once = Write(subject, b"a", {"Nats-Msg-Id": "x"}, stream=stream)
    first = await jetstream.publish(nc, once, timeout=5)
    again = await jetstream.publish(nc, once, timeout=5)
    assert first.stream == stream and first.seq == 1 and not first.duplicate
    assert again.seq == 1 and again.duplicate
    with pytest.raises(APIError) as wrong_stream:
        await jetstream.publish(nc, Write(subject, b"a", stream="ELSEWHERE"), timeout=5)
    assert wrong_stream.value.err_code == 10060
    with pytest.raises(NoStreamResponseError):
        await jetstream.publish(nc, Write(f"{settings.prefix}.nowhere", b"a"), timeout=5)
    bucket = f"{settings.prefix}-kv"
    assert await jetstream.create_key(nc, bucket, "k", b"1", timeout=5) >= 1
    with pytest.raises(KeyWrongLastSequenceError):
        await jetstream.create_key(nc, bucket, "k", b"2", timeout=5)
    assert (await (await nc.jetstream().key_value(bucket)).get("k")).value == b"1"


async def test_a_pipeline_sends_before_it_waits_and_reports_each_outcome(nc: Any, settings: Any, stream: str) -> None:
    pipeline = Pipeline(nc)
    bucket = f"{settings.prefix}-kv"
    await jetstream.create_key(nc, bucket, "taken", b"0", timeout=5)
    silent = f"{settings.prefix}.silent"

    async def ignore(msg: Any) -> None:
        """Listens, never answers."""

    await nc.subscribe(silent, cb=ignore)
    sent = [
        await pipeline.send(Write(f"{settings.prefix}.w.a", b"1", stream=stream)),
        await pipeline.send(Write(f"{settings.prefix}.w.b", b"2", stream=stream)),
        await pipeline.send(jetstream.key_create(bucket, "taken", b"1")),
        await pipeline.send(jetstream.key_create(bucket, "fresh", b"1")),
        await pipeline.send(Write(f"{settings.prefix}.nowhere", b"x")),
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
