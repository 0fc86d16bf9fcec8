"""Per-pool policies: what a request may make a worker load, and how long its job may run.

The pure checks are unit tests; the gateway's enforcement runs against a real server, with
the policy written by the real `evalq setup`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evalq import AsyncClient, InvalidField
from evalq.config import Settings
from evalq.policy import (
    PoolPolicy,
    check,
    effective_timeout,
    is_location_key,
    load_policy,
    recheck,
    revised,
)
from evalq.scheduling import Scheduling
from evalq.schemas import EvaluateRequest, format_args
from evalq.topology import Topology
from evalq.worker.argv import lmms_eval_args

from .jobs import JOB
from .test_cli import evalq

ROOTS = PoolPolicy(model_roots=["/models"])


def request(model_args: dict[str, Any] | str | None = None, **fields: Any) -> EvaluateRequest:
    return msgspec.convert({**JOB, "model": "huggingface", "model_args": model_args, **fields}, EvaluateRequest)


def as_string(args: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in args.items())


def refusal(req: EvaluateRequest, policy: PoolPolicy) -> str:
    """The JSON path `check` refuses `req` at (it must refuse it)."""
    with pytest.raises(InvalidField) as caught:
        check(req, policy)
    assert caught.value.code == 422
    assert caught.value.path is not None
    return caught.value.path


both_forms = pytest.mark.parametrize("form", [dict, as_string], ids=["dict", "string"])


# --- check: pure ----------------------------------------------------------------------


@both_forms
def test_the_default_policy_refuses_remote_code_local_paths_and_hub_ids(form: Any) -> None:
    default = PoolPolicy()
    assert refusal(request(form({"pretrained": "/models/m"})), default) == "$.model_args.pretrained"
    assert refusal(request(form({"pretrained": "org/model"})), default) == "$.model_args.pretrained"
    assert refusal(request(form({"trust_remote_code": True})), default) == "$.model_args.trust_remote_code"
    # A bare name is a canonical hub model or an API model's name: no organisation to fake.
    check(request(form({"pretrained": "gpt2", "max_pixels": 1024})), default)
    check(request(), default)
    check(request(form({"trust_remote_code": False})), default)


@both_forms
def test_remote_code_is_allowed_for_a_local_model_under_a_root(form: Any) -> None:
    check(request(form({"pretrained": "/models/tiny", "trust_remote_code": True, "device_map": "cpu"})), ROOTS)
    check(request(form({"pretrained": "/models/./a//tiny/", "trust_remote_code": True})), ROOTS)
    check(request(form({"pretrained": "/models", "trust_remote_code": True})), ROOTS)


@both_forms
@pytest.mark.parametrize(
    "path",
    ["/other/m", "/models/../etc", "/models/x/../../etc/passwd", "/modelsX/m", "/", "//etc", "/models/.."],
)
def test_a_path_outside_the_roots_is_refused(form: Any, path: str) -> None:
    assert refusal(request(form({"pretrained": path})), ROOTS) == "$.model_args.pretrained"
    assert refusal(request(form({"model_path": path, "trust_remote_code": True})), ROOTS) == "$.model_args.model_path"


@both_forms
@pytest.mark.parametrize("value", ["a/b/c", "./m", "../m", "~/m", "~root/m", "https://host/m", "hf://org/m", "."])
def test_a_location_that_is_neither_an_absolute_path_nor_a_hub_id_is_refused(form: Any, value: str) -> None:
    policy = PoolPolicy(model_roots=["/"], hub_prefixes=["*"], trust_remote_code=True)
    assert refusal(request(form({"pretrained": value})), policy) == "$.model_args.pretrained"


@both_forms
def test_remote_code_needs_the_model_and_every_other_location_local(form: Any) -> None:
    hub = PoolPolicy(model_roots=["/models"], hub_prefixes=["org"])
    # Without a model location the model's default, a hub id, would run its code.
    assert refusal(request(form({"trust_remote_code": True})), hub) == "$.model_args.trust_remote_code"
    assert refusal(request(form({"tokenizer": "/models/t", "trust_remote_code": True})), hub).endswith(
        "trust_remote_code"
    )
    mixed = form({"pretrained": "/models/m", "tokenizer": "org/tok", "trust_remote_code": True})
    assert refusal(request(mixed), hub) == "$.model_args.trust_remote_code"
    # The pool's leave covers hub ids it allows.
    check(request(mixed), revised(hub, trust_remote_code=True))
    check(request(form({"pretrained": "org/m", "trust_remote_code": True})), revised(hub, trust_remote_code=True))


@pytest.mark.parametrize(("value", "is_set"), [(True, True), ("True", True), ("yes", True), (1, True), ("nan", True),
                                                 (2.5, True), (False, False), ("false", False), ("0", False),
                                                 (0, False), ("0.0", False)])  # fmt: skip
def test_trust_remote_code_counts_as_set_as_lmms_eval_reads_it(value: Any, is_set: bool) -> None:
    req = request({"pretrained": "gpt2", "trust_remote_code": value})
    if is_set:
        assert refusal(req, PoolPolicy()) == "$.model_args.trust_remote_code"
    else:
        check(req, PoolPolicy())


def test_a_quote_cannot_hide_the_model_from_the_check() -> None:
    # lmms-eval does not split inside quotes: it would read one argument `x` here and load its
    # default model (a hub id) with trust_remote_code, though evalq sees a local `pretrained`.
    hidden = {"trust_remote_code": True, "x": "'", "pretrained": "/models/m"}
    assert refusal(request(hidden), ROOTS) == "$.model_args.trust_remote_code"
    assert refusal(request(as_string(hidden)), ROOTS) == "$.model_args.trust_remote_code"


def test_the_last_of_a_repeated_key_is_not_the_only_one_checked() -> None:
    assert refusal(request("pretrained=/models/m,pretrained=/etc"), ROOTS) == "$.model_args.pretrained"
    assert refusal(request("pretrained=/etc,pretrained=/models/m"), ROOTS) == "$.model_args.pretrained"


@both_forms
def test_hub_prefixes(form: Any) -> None:
    org = PoolPolicy(hub_prefixes=["my-org"])
    check(request(form({"pretrained": "my-org/model"})), org)
    check(request(form({"pretrained": "MY-ORG/model"})), org)  # organisations are unique regardless of case
    assert refusal(request(form({"pretrained": "my-org-two/model"})), org) == "$.model_args.pretrained"
    assert refusal(request(form({"pretrained": "other/model"})), org) == "$.model_args.pretrained"
    exact = PoolPolicy(hub_prefixes=["org/eval-"])
    check(request(form({"pretrained": "org/eval-7b"})), exact)
    assert refusal(request(form({"pretrained": "org/train-7b"})), exact) == "$.model_args.pretrained"
    check(request(form({"pretrained": "anyone/anything"})), PoolPolicy(hub_prefixes=["*"]))
    # Hub ids allowed do not bring remote code with them.
    assert refusal(request(form({"pretrained": "my-org/m", "trust_remote_code": True})), org).endswith(
        "trust_remote_code"
    )


def test_every_path_parameter_of_lmms_evals_models_is_a_location() -> None:
    import lmms_eval

    names: set[str] = set()
    for source in (Path(lmms_eval.__file__).parent / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                names.update(arg.arg for arg in node.args.args + node.args.kwonlyargs)
    path_like = {n for n in names if "pretrained" in n or n.endswith(("_path", "_dir", "_checkpoint"))}
    assert {"pretrained", "model_path", "mcp_server_path", "pretrained_vit"} <= path_like
    assert not {n for n in path_like if not is_location_key(n)}
    assert not is_location_key("max_pixels") and not is_location_key("device_map")


def test_the_checked_text_is_the_text_a_worker_passes() -> None:
    request = EvaluateRequest(model="dummy", tasks=["t"], model_args={"pretrained": "/m", "trust_remote_code": True})
    argv = lmms_eval_args(request, output_path=Path("/o"), include_path=Path("/i"))
    assert f"--model_args={format_args(request.model_args)}" in argv
    assert format_args({"flag": False, "n": 3, "t": 0.5}) == "flag=False,n=3,t=0.5"


def test_timeouts() -> None:
    capped = PoolPolicy(default_timeout_s=60, max_timeout_s=3600)
    assert refusal(request(timeout=3601), capped) == "$.timeout"
    check(request(timeout=3600), capped)
    check(request(timeout=10**6), PoolPolicy())
    assert effective_timeout(request(), capped) == 60
    assert effective_timeout(request(timeout=120), capped) == 120
    assert effective_timeout(request(timeout=7200), capped) == 3600  # a job from before the limit was lowered
    assert effective_timeout(request(), PoolPolicy(max_timeout_s=50)) == 50
    assert effective_timeout(request(), PoolPolicy()) is None
    with pytest.raises(msgspec.ValidationError, match="default_timeout_s"):
        revised(PoolPolicy(), default_timeout_s=100, max_timeout_s=10)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**JOB, "timeout": 0}, EvaluateRequest)


# --- recheck: a worker's disk --------------------------------------------------------------


def test_recheck_resolves_symlinks_out_of_a_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    policy = PoolPolicy(model_roots=[str(root)])
    inside = request({"pretrained": str(root / "real"), "trust_remote_code": True})
    escaping = request({"pretrained": str(root / "escape" / "m"), "trust_remote_code": True})
    check(escaping, policy)  # lexically it is under the root: only the worker's disk tells
    assert recheck(inside, policy) is None
    reason = recheck(escaping, policy)
    assert reason is not None and "$.model_args.pretrained" in reason


def test_recheck_refuses_a_weight_file_linked_from_outside_the_root(tmp_path: Path) -> None:
    # The folder is under the root; a file the loader opens inside it is not.
    root, outside = tmp_path / "models", tmp_path / "outside"
    model = root / "m"
    (model / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"weights from elsewhere")
    (model / "config.json").write_text("{}")
    (root / "blobs").mkdir()
    (root / "blobs" / "abc").write_bytes(b"cached")
    (model / "cached.bin").symlink_to(root / "blobs" / "abc")  # a cache's link inside the root is fine
    policy = PoolPolicy(model_roots=[str(root)])
    asked = request({"pretrained": str(model)})
    assert recheck(asked, policy) is None
    (model / "sub" / "model.safetensors").symlink_to(outside / "model.safetensors")
    check(asked, policy)  # the gateway cannot see the files
    reason = recheck(asked, policy)
    assert reason is not None and "sub/model.safetensors" in reason and "$.model_args.pretrained" in reason


@both_forms
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("vision_tower", "other-org/clip"),
        ("tokenizer_name", "other-org/tok"),
        ("model_name", "other-org/m"),
        ("peft", "other-org/adapter"),
        ("base_url", "http://attacker.example/v1"),
        ("server_url", "https://judge.example"),
    ],
)
def test_every_key_that_names_a_model_or_a_location_is_checked(form: Any, key: str, value: str) -> None:
    assert refusal(request(form({key: value})), PoolPolicy(hub_prefixes=["my-org"])) == f"$.model_args.{key}"


@both_forms
def test_url_prefixes(form: Any) -> None:
    judge = PoolPolicy(url_prefixes=["http://judge:8000"])
    check(request(form({"base_url": "http://judge:8000"})), judge)
    check(request(form({"base_url": "http://judge:8000/v1"})), judge)
    check(request(form({"base_url": "HTTP://JUDGE:8000/v1"})), judge)  # scheme and host regardless of case
    assert refusal(request(form({"base_url": "http://judge:8000.evil.example/v1"})), judge) == "$.model_args.base_url"
    assert refusal(request(form({"base_url": "http://judge:80"})), judge) == "$.model_args.base_url"
    assert refusal(request(form({"base_url": "https://judge:8000"})), judge) == "$.model_args.base_url"
    check(request(form({"base_url": "https://anywhere/v1"})), PoolPolicy(url_prefixes=["*"]))
    # A URL is no local model: it never brings remote code with it.
    assert refusal(request(form({"base_url": "http://judge:8000", "trust_remote_code": True})), judge).endswith(
        "trust_remote_code"
    )
    with pytest.raises(msgspec.ValidationError):
        revised(PoolPolicy(), url_prefixes=["judge:8000"])


def test_recheck_treats_a_name_that_exists_beside_the_job_as_a_local_path(tmp_path: Path) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    req = request({"pretrained": "org/model"})
    policy = PoolPolicy(hub_prefixes=["org"])
    assert recheck(req, policy, cwd=tmp_path / "elsewhere") is None
    reason = recheck(req, policy, cwd=tmp_path)
    assert reason is not None and "model root" in reason
    assert recheck(req, revised(policy, model_roots=[str(tmp_path)]), cwd=tmp_path) is None


# --- the gateway, with policies written by `evalq setup` --------------------------------------


async def stored(nc: Any, topology: Topology, pool: str = "default") -> int:
    """Jobs enqueued: each has its record in the jobs bucket (the queue)."""
    return (await nc.jetstream().stream_info(f"KV_{topology.jobs_bucket}")).state.messages


async def test_setup_writes_the_policy_the_gateway_enforces(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    code, out, err = await evalq(
        settings, "setup", "--model-root", f"{models}/./", "--hub-prefix", "my-org", "--max-timeout", "600", "--json"
    )
    assert code == 0, err
    written = {
        "trust_remote_code": False,
        "model_roots": [str(models)],
        "hub_prefixes": ["my-org"],
        "url_prefixes": [],
        "stall_after_s": 1800,
        "stall_action": "report",
        "cache": "read-write",
        "default_timeout_s": None,
        "max_timeout_s": 600,
        "scheduling": msgspec.to_builtins(Scheduling()),
    }
    assert json.loads(out) == [
        {"object": "pool default", "setting": "policy", "was": msgspec.to_builtins(PoolPolicy()), "now": written}
    ]
    assert msgspec.to_builtins(await load_policy(nc.jetstream(), topology, "default")) == written

    refused = [
        ({"pretrained": "/etc", "trust_remote_code": True}, "$.model_args.pretrained"),
        (f"pretrained={models}/../secret", "$.model_args.pretrained"),
        ({"pretrained": "other-org/m"}, "$.model_args.pretrained"),
        ({"pretrained": "my-org/m", "trust_remote_code": True}, "$.model_args.trust_remote_code"),
    ]
    for model_args, path in refused:
        with pytest.raises(InvalidField) as caught:
            await client.submit(**JOB, model_args=model_args)
        assert caught.value.path == path
    with pytest.raises(InvalidField) as caught:
        await client.submit(**JOB, timeout=601)
    assert caught.value.path == "$.timeout"
    assert await stored(nc, topology) == 0, "a refused request was enqueued"

    accepted = await client.submit(**JOB, model_args={"pretrained": f"{models}/tiny", "trust_remote_code": True})
    await client.submit(**JOB, model_args="pretrained=my-org/m", timeout=600)
    assert accepted.status == "queued" and await stored(nc, topology) == 2

    # Setup without policy options leaves the policy alone; with the same ones it changes nothing.
    code, out, _ = await evalq(settings, "setup", "--max-timeout", "600")
    assert code == 0 and "as configured" in out
    assert msgspec.to_builtins(await load_policy(nc.jetstream(), topology, "default")) == written


async def test_a_pool_never_set_up_refuses_remote_code(
    settings: Settings, client: AsyncClient, nc: Any, topology: Topology, tmp_path: Path
) -> None:
    await topology.ensure_pool(nc.jetstream(), "other")
    tiny = {"pretrained": str(tmp_path / "tiny"), "trust_remote_code": True}
    with pytest.raises(InvalidField) as caught:
        await client.submit(**JOB, pool="other", model_args={**tiny, "pretrained": "gpt2"})
    assert caught.value.path == "$.model_args.trust_remote_code"
    with pytest.raises(InvalidField) as caught:
        await client.submit(**JOB, pool="other", model_args=tiny)
    assert caught.value.path == "$.model_args.pretrained"
    # An unreadable policy is the default: it fails closed.
    kv = await nc.jetstream().key_value(topology.pools_bucket)
    await kv.put("other", b'{"trust_remote_code": true, "from_a_newer_setup": 1}')
    assert await load_policy(nc.jetstream(), topology, "other") == PoolPolicy()
    assert await stored(nc, topology, "other") == 0
    accepted = await client.submit(**JOB, pool="other")
    assert accepted.status == "queued"


async def test_a_changed_policy_is_in_force_within_two_seconds(
    settings: Settings, client: AsyncClient, tmp_path: Path
) -> None:
    args = {"pretrained": str(tmp_path / "m"), "trust_remote_code": True}
    with pytest.raises(InvalidField):
        await client.submit(**JOB, model_args=args)
    code, _, err = await evalq(settings, "setup", "--model-root", str(tmp_path))
    assert code == 0, err
    written = time.monotonic()
    while True:  # the gateway reads a pool's policy at most 2 s stale
        try:
            await client.submit(**JOB, model_args=args)
            break
        except InvalidField:
            assert time.monotonic() - written < 5, "the new policy was not in force after 5 s"
            await asyncio.sleep(0.1)


async def test_setup_refuses_bad_policy_options_before_changing_anything(
    settings: Settings, nc: Any, topology: Topology
) -> None:
    code, _, err = await evalq(settings, "setup", "--model-root", "models", "--max-timeout", "10")
    assert code == 2 and "absolute" in err
    code, _, err = await evalq(settings, "setup", "--default-timeout", "100", "--max-timeout", "10")
    assert code == 2 and "default_timeout_s" in err
    assert await load_policy(nc.jetstream(), topology, "default") == PoolPolicy()
