"""The gateway over a real nats-server: every endpoint, every error code, positions."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import msgspec
import pytest

from evalq import AsyncClient, errors
from evalq.config import Settings
from evalq.gateway import Gateway
from evalq.gateway.idempotency import KeyClaim, request_fingerprint
from evalq.jobstore import JobStore
from evalq.schemas import EvaluateRequest, JobInfo, WorkerInfo, decode, encode
from evalq.topology import Topology

from .jobs import JOB


async def stream_messages(nc: Any, topology: Topology, pool: str = "default") -> int:
    return (await nc.jetstream().stream_info(topology.work_stream(pool))).state.messages


async def queued_jobs(nc: Any, topology: Topology, pool: str = "default") -> int:
    """Jobs waiting in `pool`: their records, which are the queue."""
    kv = await nc.jetstream().key_value(topology.jobs_bucket)
    try:
        keys = await kv.keys()
    except Exception:  # no keys at all
        return 0
    infos = [decode((await kv.get(k)).value, JobInfo) for k in keys]
    return sum(1 for i in infos if i.status == "queued" and i.pool == pool)


async def raw(nc: Any, topology: Topology, endpoint: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return await nc.request(topology.subject(endpoint), body, timeout=10, headers=headers)


async def test_submit_stores_job_record_and_event(client: AsyncClient, nc: Any, topology: Topology) -> None:
    accepted = await client.submit(**JOB, labels={"epoch": "3"})
    assert accepted.status == "queued"
    assert accepted.position_in_queue == 0
    assert accepted.duplicate is False
    js = nc.jetstream()
    # The record is the queue: with no worker free, nothing is admitted to the work stream.
    record = await js.get_msg(f"KV_{topology.jobs_bucket}", accepted.stream_seq)
    assert record.subject == f"$KV.{topology.jobs_bucket}.{accepted.job_id}"
    assert await stream_messages(nc, topology) == 0
    info = await client.get_job(accepted.job_id)
    assert info.status == "queued" and info.admitted_at is None
    assert info.labels == {"epoch": "3"}
    assert info.request is not None and info.request.tasks == ["evalq_demo"]
    event = await js.get_last_msg(
        topology.events_stream, topology.event_subject(accepted.job_id, "queued", team="default")
    )
    assert json.loads(event.data)["labels"] == {"epoch": "3"}


async def test_raw_request_by_hand_gets_plain_json(nc: Any, gateway: Gateway, topology: Topology) -> None:
    reply = await raw(nc, topology, "submit", b'{"model": "dummy", "tasks": ["evalq_demo"], "limit": 4}')
    body = json.loads(reply.data)
    assert body["status"] == "queued" and body["position_in_queue"] == 0
    assert "Nats-Service-Error-Code" not in (reply.headers or {})
    status = json.loads((await raw(nc, topology, "status", json.dumps({"job_id": body["job_id"]}).encode())).data)
    assert status["job_id"] == body["job_id"] and status["position_in_queue"] == 0
    queue = json.loads((await raw(nc, topology, "queue", b"")).data)
    assert queue["queued_jobs"] == {"default": [body["job_id"]]}
    health = json.loads((await raw(nc, topology, "health", b"")).data)
    assert health["status"] == "healthy" and health["queue_size"] == 1


async def test_positions_follow_submits_and_cancels(client: AsyncClient) -> None:
    ids = [(await client.submit(**JOB)).job_id for _ in range(5)]
    assert [(await client.get_job(j)).position_in_queue for j in ids] == [0, 1, 2, 3, 4]
    cancelled = await client.cancel_job(ids[2])
    assert cancelled.status == "cancelled"
    positions = [(await client.get_job(j)).position_in_queue for j in ids]
    assert positions == [0, 1, None, 2, 3]
    queue = await client.queue()
    assert queue.queued_jobs["default"] == [ids[0], ids[1], ids[3], ids[4]]
    assert queue.queue_size == 4
    assert queue.cancelled_jobs == 1
    accepted = await client.submit(**JOB)
    assert accepted.position_in_queue == 4


async def test_positions_survive_a_gateway_restart(nc: Any, settings: Settings, topology: Topology) -> None:
    async with Gateway(nc, settings, topology), AsyncClient(settings) as client:
        ids = [(await client.submit(**JOB)).job_id for _ in range(4)]
        await client.cancel_job(ids[1])
        before = [(await client.get_job(j)).position_in_queue for j in ids]
    async with Gateway(nc, settings, topology), AsyncClient(settings) as client:
        after = [(await client.get_job(j)).position_in_queue for j in ids]
    assert before == after == [0, None, 1, 2]


async def test_gateway_restart_mid_stream_loses_no_job(nc: Any, settings: Settings, topology: Topology) -> None:
    total = 40
    accepted: list[str] = []
    first = await Gateway(nc, settings, topology).start()
    restarted = asyncio.Event()

    async def submitter() -> None:
        async with AsyncClient(settings) as client:
            for index in range(total):
                result = await client.submit(**JOB, idempotency_key=f"job-{index}", retries=8)
                accepted.append(result.job_id)
                if index == total // 2:
                    restarted.set()

    async def restarter() -> None:
        await restarted.wait()
        await first.stop()
        second = await Gateway(nc, settings, topology).start()
        await submitting
        await second.stop()

    submitting = asyncio.create_task(submitter())
    await asyncio.wait_for(asyncio.gather(submitting, restarter()), 120)
    assert len(accepted) == len(set(accepted)) == total
    assert await queued_jobs(nc, topology) == total


async def test_idempotency_key_returns_the_same_job(client: AsyncClient, nc: Any, topology: Topology) -> None:
    first = await client.submit(**JOB, idempotency_key="retry-me")
    second = await client.submit(**JOB, idempotency_key="retry-me")
    assert second.job_id == first.job_id
    assert (first.duplicate, second.duplicate) == (False, True)
    assert await queued_jobs(nc, topology) == 1


async def test_two_concurrent_submits_with_one_key_make_one_job(
    client: AsyncClient, nc: Any, topology: Topology
) -> None:
    results = await asyncio.gather(*(client.submit(**JOB, idempotency_key="race") for _ in range(8)))
    assert len({r.job_id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert await queued_jobs(nc, topology) == 1


async def test_a_key_is_tied_to_its_request(client: AsyncClient, nc: Any, topology: Topology) -> None:
    first = await client.submit(
        **JOB, model_args={"a": 1, "b": "x"}, labels={"step": "2000"}, idempotency_key="step-2000"
    )
    # The same request, its keys in another order, is the same request.
    again = await client.submit(
        **JOB, labels={"step": "2000"}, model_args={"b": "x", "a": 1}, idempotency_key="step-2000"
    )
    assert (again.job_id, again.duplicate) == (first.job_id, True)
    other = {"model": "other_model", "tasks": ["other_task"]}
    with pytest.raises(errors.WrongState) as caught:
        await client.submit(**other, idempotency_key="step-2000")
    assert caught.value.code == 409
    assert "already used for another request" in caught.value.message
    assert first.job_id in caught.value.message
    reply = await raw(nc, topology, "submit", encode({**JOB, "limit": 2}), {"Idempotency-Key": "step-2000"})
    assert reply.headers["Nats-Service-Error-Code"] == "409"
    assert json.loads(reply.data)["error"]["path"] == "$"
    assert await queued_jobs(nc, topology) == 1  # the other requests were never enqueued
    info = await client.get_job(first.job_id)
    assert info.request is not None and info.request.model_args == {"a": 1, "b": "x"}


async def claim_key(nc: Any, topology: Topology, key: str, value: bytes) -> None:
    """What a first attempt that died before recording its job leaves: the key's entry only."""
    kv = await nc.jetstream().key_value(topology.idempotency_bucket)
    await kv.create(hashlib.sha256(key.encode()).hexdigest(), value)


async def test_a_retry_after_the_first_attempt_died_keeps_its_job_and_its_request(
    client: AsyncClient, nc: Any, topology: Topology
) -> None:
    job_id = "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e"
    fingerprint = request_fingerprint(decode(encode(JOB), EvaluateRequest))
    await claim_key(nc, topology, "died", encode(KeyClaim(job_id=job_id, fingerprint=fingerprint)))
    with pytest.raises(errors.WrongState) as caught:
        await client.submit(**JOB, limit=3, idempotency_key="died")
    assert job_id in caught.value.message
    assert await queued_jobs(nc, topology) == 0
    retried = await client.submit(**JOB, idempotency_key="died")
    assert (retried.job_id, retried.duplicate) == (job_id, True)
    assert (await client.get_job(job_id)).status == "queued"
    assert await queued_jobs(nc, topology) == 1


async def test_an_older_gateways_plain_job_id_entry_is_still_read(
    client: AsyncClient, nc: Any, topology: Topology
) -> None:
    job_id = "7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
    await claim_key(nc, topology, "old", job_id.encode())
    retried = await client.submit(**JOB, idempotency_key="old")
    assert (retried.job_id, retried.duplicate) == (job_id, True)
    # Once the job is recorded, its record's request is what the key was used for.
    assert (await client.submit(**JOB, idempotency_key="old")).job_id == job_id
    with pytest.raises(errors.WrongState):
        await client.submit(**JOB, limit=3, idempotency_key="old")
    assert await queued_jobs(nc, topology) == 1


async def test_concurrent_submits_of_different_requests_with_one_key_make_one_job(
    client: AsyncClient, nc: Any, topology: Topology
) -> None:
    variants = [{**JOB, "limit": 1 + index % 2} for index in range(8)]
    results = await asyncio.gather(
        *(client.submit(**variant, idempotency_key="shared") for variant in variants), return_exceptions=True
    )
    accepted = [(variant, r) for variant, r in zip(variants, results, strict=True) if not isinstance(r, BaseException)]
    refused = [(variant, r) for variant, r in zip(variants, results, strict=True) if isinstance(r, BaseException)]
    assert all(isinstance(r, errors.WrongState) for _, r in refused), refused
    assert len({r.job_id for _, r in accepted}) == 1
    assert sum(not r.duplicate for _, r in accepted) == 1
    winner = accepted[0][0]["limit"]
    assert {v["limit"] for v, _ in accepted} == {winner}  # every same request got the job...
    assert {v["limit"] for v, _ in refused} == {2 if winner == 1 else 1}  # ...and every other one a 409
    assert await queued_jobs(nc, topology) == 1
    info = await client.get_job(accepted[0][1].job_id)
    assert info.request is not None and info.request.limit == winner


async def test_many_requests_in_flight_are_served_together(client: AsyncClient, gateway: Gateway) -> None:
    results = await asyncio.gather(*(client.submit(**JOB) for _ in range(200)))
    assert sorted(r.position_in_queue for r in results) == list(range(200))  # type: ignore[type-var]
    assert gateway.peak_in_flight > 1, "handlers ran one at a time"


BAD_INPUTS = [
    (b"{not json", 400, "$"),
    (b'{"model": "dummy", "tasks": ["\xff\xfe"]}', 400, "$"),
    (b"\x00\x01\x02", 400, "$"),
    (b'["dummy"]', 422, "$"),
    (b'{"model": 3, "tasks": ["a"]}', 422, "$.model"),
    (b'{"model": "dummy", "tasks": ["a"], "modle_args": "x=1"}', 422, "$"),
    (b'{"model": "dummy", "tasks": []}', 422, "$.tasks"),
    (encode({"model": "dummy", "tasks": ["t"] * 10_000}), 422, "$.tasks"),
    (b'{"model": "dummy", "tasks": ["a"], "model_args": {"pretrained": "a,b"}}', 422, "$.model_args.pretrained"),
    (b'{"model": "dummy", "tasks": ["a"], "output_dir": "../../etc"}', 422, "$.output_dir"),
    (b'{"model": "dummy", "tasks": ["a"], "output_dir": "/abs"}', 422, "$.output_dir"),
    (b'{"model": "dummy", "tasks": ["a"], "pool": "nope"}', 422, "$.pool"),
    (encode({"model": "dummy", "tasks": ["a"], "labels": {"x": "y" * 900_000}}), 413, "$"),
    # `$` in a pattern also matches before a final newline: every check is a full match.
    (encode({**JOB, "pool": "default\n"}), 422, "$.pool"),
    (encode({**JOB, "output_dir": "evil\n"}), 422, "$.output_dir"),
    (encode({**JOB, "model": "dummy\n"}), 422, "$.model"),
    (encode({**JOB, "model_args": {"pretrained\n": "m"}}), 422, "$.model_args"),
    (encode({**JOB, "gen_kwargs": "temperature=0\n"}), 422, "$.gen_kwargs"),
    # Labels are printed wherever events are: no control character.
    (encode({**JOB, "labels": {"epoch": "3\x00"}}), 422, "$.labels.epoch"),
    (encode({**JOB, "labels": {"epoch": "3\r\nforged line"}}), 422, "$.labels.epoch"),
    (encode({**JOB, "labels": {"epoch": "\x1b]0;title\x07"}}), 422, "$.labels.epoch"),
    # Nor a character that reorders or hides what is shown (`evalq queue`, the dashboard).
    (encode({**JOB, "labels": {"run": "safe\u202eexe.txt"}}), 422, "$.labels.run"),
    (encode({**JOB, "labels": {"run": "a\u200bb"}}), 422, "$.labels.run"),
    # Requests are readable by every submitter: no credential in them.
    (encode({**JOB, "model_args": {"pretrained": "m", "hf_token": "hf_x"}}), 422, "$.model_args.hf_token"),
    # Integers bounded to what lmms-eval takes.
    (encode({**JOB, "limit": 10**30}), 422, "$.limit"),
    (encode({**JOB, "model_args": {"max_pixels": 2**60}}), 422, "$.model_args[...]"),
]


@pytest.mark.parametrize(("body", "code", "path"), BAD_INPUTS)
async def test_bad_input_is_refused_and_never_enqueued(
    nc: Any, gateway: Gateway, topology: Topology, caplog: pytest.LogCaptureFixture, body: bytes, code: int, path: str
) -> None:
    caplog.set_level(logging.WARNING, logger="evalq")
    reply = await raw(nc, topology, "submit", body)
    assert reply.headers["Nats-Service-Error-Code"] == str(code)
    assert reply.headers["Nats-Service-Error"]
    error = json.loads(reply.data)["error"]
    assert (error["code"], error["path"]) == (code, path)
    assert "Traceback" not in reply.data.decode()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # no internal error
    assert await queued_jobs(nc, topology) == 0
    ok = await raw(nc, topology, "submit", encode(JOB))  # and the gateway keeps serving
    assert json.loads(ok.data)["status"] == "queued"


async def test_unknown_pool_names_the_known_pools(client: AsyncClient) -> None:
    with pytest.raises(errors.InvalidField) as caught:
        await client.submit(**JOB, pool="big")
    assert caught.value.path == "$.pool"
    assert "default" in caught.value.message


async def test_status_and_cancel_errors(client: AsyncClient, nc: Any, topology: Topology) -> None:
    missing = "0b4c1a52-0d4e-4a3b-9d1e-2f1f9b7c6d5e"
    with pytest.raises(errors.JobNotFound):
        await client.get_job(missing)
    with pytest.raises(errors.JobNotFound):
        await client.cancel_job(missing)
    with pytest.raises(errors.InvalidField) as caught:
        await client.get_job("not-a-uuid")
    assert caught.value.path == "$.job_id"
    reply = await raw(nc, topology, "status", b"{")
    assert reply.headers["Nats-Service-Error-Code"] == "400"
    job = (await client.submit(**JOB)).job_id
    await client.cancel_job(job)
    with pytest.raises(errors.WrongState) as wrong:
        await client.cancel_job(job)
    assert wrong.value.code == 409


async def test_cancel_of_a_running_job_asks_its_worker(client: AsyncClient, nc: Any, topology: Topology) -> None:
    job = (await client.submit(**JOB)).job_id
    jobs = JobStore(await nc.jetstream().key_value(topology.jobs_bucket))
    await jobs.transition(job, lambda info: msgspec.structs.replace(info, status="running", worker="w1"))
    reply = await client.cancel_job(job)
    assert reply.status == "cancelling"
    info = await client.get_job(job)
    assert info.status == "cancelling" and info.cancel_requested_at is not None
    again = await client.cancel_job(job)
    assert again.status == "cancelling"


async def test_full_queue_answers_503_and_drops_nothing(nc: Any, settings: Settings) -> None:
    small = settings.with_(queue_limit=2)
    topology = Topology.from_settings(small)
    async with Gateway(nc, small, topology), AsyncClient(small) as client:
        await client.submit(**JOB)
        await client.submit(**JOB)
        with pytest.raises(errors.Unavailable) as caught:
            await client.submit(**JOB, retries=0)
        assert caught.value.code == 503
        assert await queued_jobs(nc, topology) == 2


async def test_workers_advertise_what_submit_accepts(client: AsyncClient, nc: Any, topology: Topology) -> None:
    kv = await nc.jetstream().key_value(topology.workers_bucket)
    worker = WorkerInfo(worker_id="w1", host="h", pid=1, models=["dummy"], tasks=["evalq_demo"], gpu_count=2)
    await kv.put("w1", encode(worker))
    assert await client.list_tasks() == ["evalq_demo"]
    assert await client.list_models() == ["dummy"]
    assert [w.worker_id for w in (await client.health()).workers] == ["w1"]
    with pytest.raises(errors.InvalidField) as task:
        await client.submit(model="dummy", tasks=["evalq_demo", "nope"])
    assert task.value.path == "$.tasks[1]"
    with pytest.raises(errors.InvalidField) as model:
        await client.submit(model="nope", tasks=["evalq_demo"])
    assert model.value.path == "$.model"
    with pytest.raises(errors.InvalidField) as gpus:
        await client.submit(**JOB, num_gpus=4)
    assert gpus.value.path == "$.num_gpus"
    assert (await client.submit(**JOB, num_gpus=2)).status == "queued"


async def test_a_job_record_is_a_jobinfo(client: AsyncClient) -> None:
    info = await client.get_job((await client.submit(**JOB)).job_id)
    assert isinstance(info, JobInfo)
    assert info.attempts == 0 and info.worker is None and info.result is None


async def test_positions_under_load_follow_the_order_of_submission(client: AsyncClient) -> None:
    results = await asyncio.gather(*(client.submit(**JOB) for _ in range(100)))
    assert sorted(r.position_in_queue for r in results) == list(range(100))  # type: ignore[type-var]
    by_seq = sorted(results, key=lambda r: r.stream_seq)
    assert [r.position_in_queue for r in by_seq] == list(range(100)), "FIFO within a level is submission order"


async def test_an_older_record_holding_a_credential_is_shown_without_its_request(
    client: AsyncClient, nc: Any, topology: Topology
) -> None:
    # Written before credentials were refused: the record must not hand the token to whoever asks.
    accepted = await client.submit(**JOB)
    kv = await nc.jetstream().key_value(topology.jobs_bucket)
    entry = await kv.get(accepted.job_id)
    raw = json.loads(entry.value)
    raw["request"]["model_args"] = {"pretrained": "m", "hf_token": "hf_planted"}
    await kv.update(accepted.job_id, json.dumps(raw).encode(), last=entry.revision)
    info = await client.get_job(accepted.job_id)
    assert info.request is None
    assert "hf_planted" not in json.dumps(msgspec.to_builtins(info))
    # A change of state writes the record back without it.
    await client.cancel_job(accepted.job_id)
    assert b"hf_planted" not in (await kv.get(accepted.job_id)).value
