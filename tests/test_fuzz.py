"""Hostile input at the submit subject: a property test over every field, and a raw fuzz.

Any value at any field gets either a valid JobAccepted or a 4xx whose JSON path points
into the body; never a 500, a crash or a hang; nothing invalid reaches the stream.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from evalq import InvalidField, policy
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.gateway import Gateway
from evalq.policy import PoolPolicy
from evalq.schemas import EvaluateRequest, JobAccepted, decode, encode
from evalq.topology import Topology

from .jobs import JOB

T = TypeVar("T")
FIELDS = [
    "model",
    "tasks",
    "model_args",
    "num_fewshot",
    "batch_size",
    "device",
    "limit",
    "gen_kwargs",
    "log_samples",
    "predict_only",
    "num_gpus",
    "output_dir",
    "pool",
    "labels",
    "timeout",
]


class GatewayThread:
    """A gateway and a raw connection on an event loop of their own, for synchronous callers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.gateway_nc = await connect(self.settings)
        self.nc = await connect(self.settings)
        self.gateway = await Gateway(self.gateway_nc, self.settings).start()

    async def request(self, body: bytes) -> tuple[int, dict[str, Any]]:
        reply = await self.nc.request(self.topology.subject("submit"), body, timeout=30)
        code = int((reply.headers or {}).get("Nats-Service-Error-Code", 200))
        return code, json.loads(reply.data)

    async def stored(self) -> int:
        info = await self.nc.jetstream().stream_info(f"KV_{self.topology.jobs_bucket}")  # a record per job
        return int(info.state.messages)

    def close(self) -> None:
        async def stop() -> None:
            await self.gateway.stop()
            await self.gateway_nc.close()
            await self.nc.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def gateway_thread(nats_server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    settings = Settings.of(
        nats_url=[nats_server.url],
        prefix=f"fz{uuid.uuid4().hex[:8]}",
        home=str(tmp_path_factory.mktemp("fuzz")),
        handle_signals=False,
    )
    service = GatewayThread(settings)
    yield service
    service.close()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=12,
)


@st.composite
def request_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = dict(JOB)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()):
            body.pop(field, None)
        else:
            body[field] = draw(json_values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    return body


def assert_path_points_into(body: Any, path: str) -> None:
    assert path.startswith("$"), path
    if path == "$":
        return
    assert isinstance(body, dict)
    head = path[2:].split(".")[0].split("[")[0]
    assert head in body, f"{path} names no field of the body"


@given(body=request_bodies())
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_value_at_any_field_gets_an_answer_with_a_path(gateway_thread: GatewayThread, body: dict[str, Any]) -> None:
    code, reply = gateway_thread.run(gateway_thread.request(encode(body)), timeout=30)
    if code == 200:
        decode(encode(body), EvaluateRequest)  # only a valid request is accepted...
        accepted = msgspec.convert(reply, JobAccepted)
        assert accepted.status == "queued"
        return
    assert code in (400, 413, 422), (code, reply)  # ...and anything else is a 4xx, never a 500
    error = reply["error"]
    assert error["code"] == code and error["message"]
    assert_path_points_into(body, error["path"])
    if code == 422 and error["path"] != "$.pool":
        # Refused by the schema, or (a valid body) by the pool's default policy.
        try:
            request = decode(encode(body), EvaluateRequest)
        except msgspec.ValidationError:
            return
        with pytest.raises(InvalidField):
            policy.check(request, PoolPolicy())


# Cases that once got through or broke the gateway; each is sent as it is, every run.
EDGE_CASES = [
    # `$` also matches before a final newline: a pool of "default\n" was a 500.
    encode({**JOB, "pool": "default\n"}),
    encode({**JOB, "output_dir": "evil\n"}),
    encode({**JOB, "model_args": {"pretrained\n": "m"}}),
    encode({**JOB, "model_args": "pretrained=m\n"}),
    encode({**JOB, "tasks": ["evalq_demo\n"]}),
    # Control characters in a label would forge lines or send escapes to a terminal.
    encode({**JOB, "labels": {"k": "v\x00"}}),
    encode({**JOB, "labels": {"k": "v\r\n2026-01-01T00:00:00.000Z forged completed"}}),
    encode({**JOB, "labels": {"k": "\x1b]0;title\x07\x1b[2J"}}),
    encode({**JOB, "labels": {"k": "\x9b2J"}}),
    # Integers past what lmms-eval takes.
    encode({**JOB, "limit": 10**30}),
    encode({**JOB, "model_args": {"max_pixels": 2**60}}),
    encode({**JOB, "gen_kwargs": {"seed": -(2**64)}}),
]


def fuzz_cases(count: int, seed: int = 1) -> Iterator[bytes]:
    """Invalid bodies only: a case that happens to be valid is broken before it is sent."""
    yield from EDGE_CASES
    for body in _raw_cases(count - len(EDGE_CASES), seed):
        try:
            decode(body, EvaluateRequest)
        except (msgspec.DecodeError, ValueError):
            yield body
        else:
            yield body[:-1]  # e.g. `num_fewshot: 0` or a model named `--flag` (argv keeps it a value)


def _raw_cases(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    valid = encode({**JOB, "model_args": {"pretrained": "/m"}, "limit": 4, "labels": {"k": "v"}})
    for index in range(count):
        kind = index % 8
        if kind == 0:
            yield rng.randbytes(rng.randint(0, 64))
        elif kind == 1:
            yield valid[: rng.randint(0, len(valid) - 1)]  # truncated JSON
        elif kind == 2:
            depth = rng.randint(100, 5000)
            yield b'{"model": "d", "tasks": ' + b"[" * depth + b"]" * depth + b"}"
        elif kind == 3:
            size = 900_000 if index % 4000 == 3 else rng.randint(1000, 20_000)
            yield b'{"model": "' + b"m" * size + b'", "tasks": ["t"]}'
        elif kind == 4:
            number = rng.choice(["1e400", "-1", "0", str(2**64), "-1e-400", "NaN", "1.5", str(10**30), "1000000001"])
            field = rng.choice(["num_gpus", "num_fewshot", "limit", "batch_size", "timeout"])
            yield f'{{"model": "d", "tasks": ["t"], "{field}": {number}}}'.encode()
        elif kind == 5:
            mutated = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            yield bytes(mutated)
        elif kind == 6:
            yield rng.choice([b"null", b"[]", b'""', b"0", b"{}", b'{"model": null}', b'{"tasks": "a"}'])
        else:
            field = rng.choice(["model_args", "gen_kwargs", "output_dir", "device", "pool", "tasks", "model", "labels"])
            hostile = rng.choice(
                [
                    *("a,b=c", "../../etc", "/abs", "x=1,y", "--flag", "$(id)", "a\nb", "\x00", "é" * 300),
                    *("default\n", "evil\n", "\x1b[31m", "\x1b]0;t\x07", "x\r\ny", "\x9b"),
                ]
            )
            value: Any = (
                [hostile] if field == "tasks" else ({"k": hostile} if field in ("model_args", "labels") else hostile)
            )
            yield encode({**JOB, field: value})


def test_edge_cases_are_refused_with_a_path(gateway_thread: GatewayThread) -> None:
    before = gateway_thread.run(gateway_thread.stored())
    for body in EDGE_CASES:
        code, reply = gateway_thread.run(gateway_thread.request(body), timeout=30)
        assert code == 422, (body, reply)
        assert_path_points_into(json.loads(body), reply["error"]["path"])
    assert gateway_thread.run(gateway_thread.stored()) == before


def test_raw_fuzz_of_the_submit_subject(gateway_thread: GatewayThread) -> None:
    total = 100_000
    before = gateway_thread.run(gateway_thread.stored())

    async def run_all() -> Counter[int]:
        codes: Counter[int] = Counter()
        window: list[asyncio.Task[tuple[int, dict[str, Any]]]] = []
        for body in fuzz_cases(total):
            window.append(asyncio.create_task(gateway_thread.request(body)))
            if len(window) >= 256:
                for code, _ in await asyncio.gather(*window):
                    codes[code] += 1
                window.clear()
        for code, _ in await asyncio.gather(*window):
            codes[code] += 1
        return codes

    codes = gateway_thread.run(run_all(), timeout=900)
    after = gateway_thread.run(gateway_thread.stored())
    replies = dict(sorted(codes.items()))
    print(f"\n[raw fuzz] cases {sum(codes.values())}, replies by code {replies}, enqueued {after - before}")
    assert sum(codes.values()) == total
    assert set(codes) <= {400, 413, 422}, codes
    assert after == before, "a fuzz case reached the stream"
    code, reply = gateway_thread.run(gateway_thread.request(encode(JOB)))
    assert code == 200 and reply["status"] == "queued"  # the gateway kept serving
