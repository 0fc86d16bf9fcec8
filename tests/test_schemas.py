"""Wire types: what is accepted, what is refused, and the JSON path of each refusal."""

from __future__ import annotations

import msgspec
import pytest

from evalq import schemas
from evalq.schemas import Cancelled, Completed, EvaluateRequest, Queued, decode, decode_event, encode, error_path

from .jobs import JOB


def refusal(body: bytes) -> tuple[str, str]:
    with pytest.raises(msgspec.DecodeError) as caught:
        decode(body, EvaluateRequest)
    return ("422" if isinstance(caught.value, msgspec.ValidationError) else "400", error_path(caught.value)[1])


def body(**fields: object) -> bytes:
    return encode({**JOB, **fields})


def test_minimal_request_gets_lmms_eval_defaults() -> None:
    request = decode(body(), EvaluateRequest)
    assert request.log_samples is True
    assert request.predict_only is False
    assert request.num_gpus == 1
    assert request.pool == "default"


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"tasks": []}, "$.tasks"),
        ({"tasks": ["ok", "bad name"]}, "$.tasks[1]"),
        ({"tasks": ["t"] * 10_000}, "$.tasks"),
        ({"model": 3}, "$.model"),
        ({"model": "a/b"}, "$.model"),
        ({"typo_field": 1}, "$"),
        ({"model_args": {"pretrained": "x,y"}}, "$.model_args.pretrained"),
        ({"model_args": {"pretrained": "a=b"}}, "$.model_args.pretrained"),
        ({"model_args": {"bad key": "v"}}, "$.model_args"),
        ({"model_args": "a=1,b=2=3"}, "$.model_args"),
        ({"gen_kwargs": "temperature"}, "$.gen_kwargs"),
        ({"output_dir": "../escape"}, "$.output_dir"),
        ({"output_dir": "a/../../b"}, "$.output_dir"),
        ({"output_dir": "/etc"}, "$.output_dir"),
        ({"limit": 0}, "$.limit"),
        ({"limit": 1.5}, "$.limit"),
        ({"num_fewshot": -1}, "$.num_fewshot"),
        ({"num_gpus": 0}, "$.num_gpus"),
        ({"batch_size": "many"}, "$.batch_size"),
        ({"device": "cuda; rm -rf /"}, "$.device"),
        ({"pool": "has.dot"}, "$.pool"),
        ({"labels": {"k": 1}}, "$.labels[...]"),
        # `$` also matches before a final newline: every pattern must match the whole value.
        ({"pool": "default\n"}, "$.pool"),
        ({"model": "dummy\n"}, "$.model"),
        ({"tasks": ["evalq_demo\n"]}, "$.tasks[0]"),
        ({"device": "cpu\n"}, "$.device"),
        ({"batch_size": "auto\n"}, "$.batch_size"),
        ({"output_dir": "evil\n"}, "$.output_dir"),
        ({"output_dir": "runs/..\n"}, "$.output_dir"),
        ({"model_args": {"pretrained\n": "m"}}, "$.model_args"),
        ({"model_args": "pretrained\n=m"}, "$.model_args"),
        ({"gen_kwargs": "temperature=0\n"}, "$.gen_kwargs"),
        ({"gen_kwargs": {"stop": "a\x85b"}}, "$.gen_kwargs.stop"),
        # No control character in a label value: C0, DEL and C1.
        ({"labels": {"epoch": "3\x00"}}, "$.labels.epoch"),
        ({"labels": {"epoch": "3\rforged"}}, "$.labels.epoch"),
        ({"labels": {"epoch": "3\nforged"}}, "$.labels.epoch"),
        ({"labels": {"ok": "x", "epoch": "\x1b[2J"}}, "$.labels.epoch"),
        ({"labels": {"epoch": "\x7f"}}, "$.labels.epoch"),
        ({"labels": {"epoch": "\x9b31m"}}, "$.labels.epoch"),
        # Nor a character that reorders, breaks or hides what is shown: bidirectional
        # overrides and isolates, the line separators, zero-width and byte-order marks.
        ({"labels": {"run": "evil\u202egnp.exe"}}, "$.labels.run"),
        ({"labels": {"run": "a\u2066b"}}, "$.labels.run"),
        ({"labels": {"run": "line\u2028forged"}}, "$.labels.run"),
        ({"labels": {"run": "ab\u200bc"}}, "$.labels.run"),
        ({"labels": {"run": "\ufeffx"}}, "$.labels.run"),
        ({"model_args": {"pretrained": "m\u202e"}}, "$.model_args.pretrained"),
        # No credential: a request is readable by every submitter.
        ({"model_args": {"pretrained": "m", "hf_token": "hf_abc"}}, "$.model_args.hf_token"),
        ({"model_args": {"api_key": "sk-1"}}, "$.model_args.api_key"),
        ({"model_args": {"openai_api_key": "sk-1"}}, "$.model_args.openai_api_key"),
        ({"model_args": "pretrained=m,token=hf_abc"}, "$.model_args.token"),
        ({"gen_kwargs": {"Password": "x"}}, "$.gen_kwargs.Password"),
        # Every int bounded to what lmms-eval takes.
        ({"limit": 10**30}, "$.limit"),
        ({"limit": 10**9 + 1}, "$.limit"),
        ({"num_fewshot": 1025}, "$.num_fewshot"),
        ({"num_gpus": 65}, "$.num_gpus"),
        ({"batch_size": 65537}, "$.batch_size"),
        ({"batch_size": "auto:10000"}, "$.batch_size"),
        ({"model_args": {"max_pixels": 2**53 + 1}}, "$.model_args[...]"),
        ({"gen_kwargs": {"seed": -(2**53) - 1}}, "$.gen_kwargs[...]"),
    ],
)
def test_invalid_fields_are_refused_with_their_path(fields: dict[str, object], path: str) -> None:
    assert refusal(body(**fields)) == ("422", path)


@pytest.mark.parametrize("raw", [b"{", b"not json", b"", b'{"model": "dummy", "tasks": ["\xff"]}', b"\xff\xfe"])
def test_malformed_bodies_are_400(raw: bytes) -> None:
    assert refusal(raw)[0] == "400"


def test_accepted_shapes() -> None:
    request = decode(
        body(
            model_args={"pretrained": "/models/m", "trust_remote_code": True, "max_pixels": 1024, "t": 0.5},
            gen_kwargs="temperature=0,max_new_tokens=8",
            limit=0.25,
            batch_size="auto:4",
            device="cuda:0",
            output_dir="runs/epoch-3",
            labels={"epoch": "3"},
        ),
        EvaluateRequest,
    )
    assert request.model_args == {"pretrained": "/models/m", "trust_remote_code": True, "max_pixels": 1024, "t": 0.5}
    assert request.limit == 0.25


def test_the_bounds_themselves_are_accepted() -> None:
    request = decode(
        body(
            limit=10**9,
            num_fewshot=1024,
            num_gpus=64,
            batch_size=65536,
            model_args={"max_pixels": 2**53, "t": 1e300},
            gen_kwargs={"seed": -(2**53)},
            labels={"note": "größe: 3 — ok"},
        ),
        EvaluateRequest,
    )
    assert request.limit == 10**9
    assert request.model_args == {"max_pixels": 2**53, "t": 1e300}
    assert request.labels == {"note": "größe: 3 — ok"}


def test_events_are_a_tagged_union() -> None:
    queued = Queued(job_id="j", time=schemas.now(), pool="big")
    data = encode(queued)
    assert msgspec.json.decode(data)["type"] == "queued"
    assert decode_event(data) == queued
    done = Completed(job_id="j", time=schemas.now(), metrics={"t": {"m": 1.0}})
    assert decode_event(encode(done)) == done
    assert isinstance(decode_event(encode(Cancelled(job_id="j", time="x"))), Cancelled)


def test_time_is_rfc3339_utc() -> None:
    stamp = schemas.now()
    assert stamp.endswith("Z") and "T" in stamp


def test_creation_stamps_increase_even_within_one_microsecond() -> None:
    clock = schemas.CreationClock()
    stamps = [clock() for _ in range(2000)]  # far more than one per microsecond of the loop
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert all(s.endswith("Z") and len(s) == len("2026-11-27T11:51:10.168123Z") for s in stamps)


def test_a_bad_dict_key_names_its_dict() -> None:
    with pytest.raises(msgspec.ValidationError) as refused:
        decode(b'{"model": "m", "tasks": ["t"], "labels": {"bad key": "v"}}', EvaluateRequest)
    assert error_path(refused.value)[1] == "$.labels"


@pytest.mark.parametrize(
    "fields",
    [
        {"labels": {"run": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"}},  # Persian needs the non-joiner
        {"labels": {"team": "\U0001f468\u200d\U0001f4bb"}},  # an emoji sequence joins with U+200D
        {"model_args": {"pretrained": "m", "use_auth_token": True}},  # use the worker's own token
        {"model_args": "pretrained=m,use_auth_token=True"},
        {"gen_kwargs": {"eos_token": "</s>", "max_new_tokens": 16}},
    ],
)
def test_what_looks_close_but_is_fine_is_accepted(fields: dict[str, object]) -> None:
    decode(body(**fields), EvaluateRequest)
