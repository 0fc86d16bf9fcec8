"""What a submitter may make a worker load, and for how long a job may run: per-pool policies.

A request's `model_args` reach the model's constructor inside a worker. Two of them matter
beyond the evaluation itself: a *model location* (`pretrained=...` and its kin) names what
the worker reads, from its disk or from a hub, and `trust_remote_code=True` lets the model
run code that comes with it. A `PoolPolicy` says which locations a pool's workers may be
made to load, and whether remote code may run; the gateway refuses anything else (422,
`check`), and a worker checks again against its own disk before it runs the job (`recheck`).

Policies live in the `<prefix>-pools` bucket (key: pool name). Only `evalq setup` writes
them; a pool without one gets `PoolPolicy()`, the default, which lets no request name a
local path or a hub repository, and no remote code run. So is a policy that cannot be read.

**Model locations.** A `model_args` key is a location when it is `pretrained` or starts
with `pretrained_`, is one of `LOCATION_KEYS`, or ends in one of `LOCATION_SUFFIXES` (the
names lmms-eval 0.7.3's models give the paths they read: `model_path`, `tokenizer`,
`mcp_server_path`, `cache_dir`, ...). Its value is one of:

- an absolute path: allowed under one of `model_roots`. The gateway normalises it without
  touching a disk (it may not have the path): `..` is resolved lexically. The worker
  resolves symlinks as well (`os.path.realpath`), so a link cannot lead out of a root;
- a hub id `org/name`: allowed when it starts with one of `hub_prefixes`;
- a bare name (`gpt2`, `llava_qwen`): allowed. Only the hub's own canonical repositories
  have no organisation, and API models are named so. A bare name that exists as a folder
  beside the job is a local path to the worker, and is checked as one;
- anything else (a relative path, `~`, a URL): refused.

**Remote code.** `trust_remote_code` is refused unless the pool allows it, or the request
names its model by a local path under the pool's roots (and every other location it names
is under them too): the operator chose what is there. Which values count as "set" follows
lmms-eval's own parsing (`True`, `1`, `yes` and any other non-false text all are).

Hub ids are not safe by default even without `trust_remote_code`: 27 of lmms-eval 0.7.3's
model classes load with `trust_remote_code=True` whatever `model_args` says, so
`hub_prefixes` should name only organisations whose code the operator trusts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from . import jetstream
from .config import Settings
from .errors import InvalidField
from .renewal import confirm_lowering
from .scheduling import Scheduling
from .schemas import CacheMode, EvaluateRequest, format_args
from .topology import Topology

__all__ = [
    "LOCATION_KEYS",
    "LOCATION_SUFFIXES",
    "Policies",
    "PoolPolicy",
    "SetupChange",
    "apply_setup",
    "check",
    "decode_policy",
    "effective_cache",
    "effective_timeout",
    "is_location_key",
    "load_policy",
    "missing_model",
    "normal_path",
    "read_policy",
    "recheck",
    "revised",
    "store_policy",
]

log = logging.getLogger("evalq.policy")

MAX_TIMEOUT_S = 30 * 86400
Seconds = Annotated[int, Meta(ge=1, le=MAX_TIMEOUT_S)]
Root = Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"\A/")]
# `*` is every hub id; a prefix with no `/` is an organisation (`my-org` matches `my-org/...`
# but not `my-org-two/...`); one with a `/` is matched as written.
# Lowercase scheme and host, as they are compared; a path part is matched as written.
UrlPrefix = Annotated[
    str, Meta(min_length=1, max_length=2048, pattern=r"\A(\*|[a-z][a-z0-9+.\-]*://[^\s/A-Z]+(/\S*)?)\Z")
]
HubPrefix = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=r"\A(\*|[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]*)?)\Z")
]


def _doc(text: str) -> Meta:
    return Meta(description=text)


class PoolPolicy(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One pool's policy, stored as JSON under the pool's name in `<prefix>-pools`.

    Unknown fields are refused, so a policy written by a newer `evalq setup` is read as
    unreadable (and the default, which refuses the most, applies) rather than half-applied.
    """

    trust_remote_code: Annotated[
        bool,
        _doc(
            "whether a request may set trust_remote_code for any model location it may name; "
            "without it, only a model named by a local path under model_roots may"
        ),
    ] = False
    model_roots: Annotated[
        list[Root],
        _doc(
            "absolute folders under which a request may name a local model (paths are normalised); none: no local path"
        ),
    ] = []
    hub_prefixes: Annotated[
        list[HubPrefix],
        _doc(
            "hub ids a request may name: an organisation (`my-org`), a prefix with a `/`, or `*` for any; "
            "none: no hub id"
        ),
    ] = []
    url_prefixes: Annotated[
        list[UrlPrefix],
        _doc(
            "URLs a request may name (an API model's or a judge's server, `base_url` and the like): "
            "a prefix ending at a path boundary (`http://judge:8000`), or `*` for any; none: no URL"
        ),
    ] = []
    stall_after_s: Annotated[
        Seconds | None,
        _doc("seconds without progress after which a running job is stalled (an event and a mark); none: never"),
    ] = 1800
    stall_action: Annotated[
        Literal["report", "fail"],
        _doc("what a stall does: `report` (the event and the mark), or `fail` (the job is stopped and fails)"),
    ] = "report"
    cache: Annotated[
        CacheMode,
        _doc(
            "the response cache for a request that does not say: `off`, `read`, `read-write` "
            "(reuse and add answers), or `refresh` (compute all and add them)"
        ),
    ] = "read-write"
    default_timeout_s: Annotated[
        Seconds | None, _doc("seconds a job without its own `timeout` may run; none: no limit")
    ] = None
    max_timeout_s: Annotated[
        Seconds | None, _doc("the largest `timeout` a request may ask for, and the limit of every job; none: no limit")
    ] = None
    scheduling: Annotated[
        Scheduling, _doc("teams' shares, quotas and priority caps, priority aging and the use half-life")
    ] = Scheduling()

    def __post_init__(self) -> None:
        default, most = self.default_timeout_s, self.max_timeout_s
        if default is not None and most is not None and default > most:
            raise ValueError("Expected default_timeout_s <= max_timeout_s - at `$.default_timeout_s`")


_policy_decoder = msgspec.json.Decoder(PoolPolicy)


def decode_policy(data: bytes) -> PoolPolicy:
    """A stored policy; `msgspec.ValidationError` or `DecodeError` if it is not one."""
    return _policy_decoder.decode(data)


# --- model locations -----------------------------------------------------------------

# Names lmms-eval 0.7.3's model classes take as a path or repository to load (their
# `__init__` parameters); a suffix covers the many `*_path`, `*_dir`, `*_checkpoint` ones.
LOCATION_KEYS = frozenset(
    {
        "pretrained",
        "model",
        "model_name_or_path",
        "model_path",
        "model_id",
        "model_base",
        "base_model",
        "path",
        "checkpoint",
        "tokenizer",
        "processor",
        "vision_tower",
        "peft",
        "adapter",
        "lora",
    }
)
# `_name` covers `model_name`, `tokenizer_name`, `model_id_name`; `_url` and `_endpoint` the
# servers an API model or a judge is sent to (`base_url`, `server_url`, `nim_base_url`).
LOCATION_SUFFIXES = (
    "_path",
    "_dir",
    "_file",
    "_checkpoint",
    "_ckpt",
    "_config",
    "_model",
    "_tokenizer",
    "_processor",
    "_name",
    "_tower",
    "_adapter",
    "_url",
    "_endpoint",
)
# The keys that name the model itself: remote code is allowed without the pool's leave
# only when one of these is given (otherwise the model's default, a hub id, is loaded).
_MODEL_KEYS = frozenset({"pretrained", "model", "model_name_or_path", "model_path", "model_id", "path", "checkpoint"})
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")
_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def is_location_key(key: str) -> bool:
    return key in LOCATION_KEYS or key.startswith("pretrained_") or key.endswith(LOCATION_SUFFIXES)


class Kind(Enum):
    LOCAL = "a local path"
    HUB = "a hub id"
    NAME = "a bare name"
    URL = "a URL"


# How a location's value is read: its kind and, for a local path, the path to compare with
# the roots. None: neither a local path nor a hub id (the caller refuses it).
Locate = Callable[[str], "tuple[Kind, str] | None"]
# Roots as this side compares them: lexically normalised at the gateway, resolved at a worker.
Resolve = Callable[[str], str]


def normal_path(path: str) -> str:
    """`path` with `.`, `..` and repeated `/` resolved lexically, as the gateway compares it."""
    normal = posixpath.normpath(path)
    # POSIX keeps a leading `//` as implementation-defined; no worker treats it specially.
    return "/" + normal.lstrip("/") if normal.startswith("/") else normal


def _locate_lexically(value: str) -> tuple[Kind, str] | None:
    if value.startswith("/"):
        return Kind.LOCAL, normal_path(value)
    if _URL.fullmatch(value):
        return Kind.URL, value
    if _HUB_ID.fullmatch(value):
        return Kind.HUB, value
    if _BARE_NAME.fullmatch(value):
        return Kind.NAME, value
    return None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _hub_allowed(value: str, prefixes: list[str]) -> bool:
    # Hub organisations are unique regardless of case, so case is not a way around a prefix.
    lowered = value.lower()
    for prefix in prefixes:
        if prefix == "*":
            return True
        wanted = prefix.lower() if "/" in prefix else prefix.lower() + "/"
        if lowered.startswith(wanted):
            return True
    return False


def _url_allowed(value: str, prefixes: list[str]) -> bool:
    scheme, _, rest = value.partition("://")
    host, slash, path = rest.partition("/")
    lowered = f"{scheme.lower()}://{host.lower()}{slash}{path}"
    for prefix in prefixes:
        if prefix == "*" or lowered == prefix:
            return True
        # A prefix ends at a boundary: `http://judge:8000` must not admit `http://judge:8000.evil.example`.
        if lowered.startswith(prefix) and (prefix.endswith("/") or lowered[len(prefix)] in "/?#"):
            return True
    return False


# --- model_args as lmms-eval reads them ------------------------------------------------


def _smart_split(text: str) -> list[str]:
    # lmms-eval 0.7.3's `_smart_comma_split`: no split inside quotes or brackets. A quote in
    # a value can hide the pairs after it from lmms-eval, so its reading is checked too.
    items: list[str] = []
    current: list[str] = []
    depth = 0
    quote: str | None = None
    for index, char in enumerate(text):
        if char in ('"', "'") and (index == 0 or text[index - 1] != "\\"):
            if quote is None:
                quote = char
            elif char == quote:
                quote = None
        elif quote is None:
            if char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
            elif char == "," and depth == 0:
                item = "".join(current).strip()
                if item:
                    items.append(item)
                current = []
                continue
        current.append(char)
    item = "".join(current).strip()
    if item:
        items.append(item)
    return items


def _readings(args: Mapping[str, object] | str | None) -> Iterator[list[tuple[str, str]]]:
    """The (key, value) pairs of `model_args` as evalq splits them, then as lmms-eval does."""
    if args is None:
        return
    text = format_args(args)
    yield [(key, value) for key, eq, value in (item.partition("=") for item in text.split(",")) if eq]
    stripped = text.strip()
    yield [(k, v) for k, eq, v in (item.partition("=") for item in _smart_split(stripped)) if eq]


def _set(value: str) -> bool:
    """Whether lmms-eval hands the model a true value for this text (its handle_arg_string)."""
    if value.lower() == "true":
        return True
    if value.lower() == "false":
        return False
    if value.isnumeric():
        return bool(int(value))
    try:
        return bool(float(value))
    except ValueError:
        return bool(value)


# --- the checks --------------------------------------------------------------------------


def _checked(request: EvaluateRequest, policy: PoolPolicy, locate: Locate, resolve: Resolve) -> None:
    roots = [resolve(root) for root in policy.model_roots]
    for pairs in _readings(request.model_args):
        local_model = False
        only_local = True
        remote_code: str | None = None
        for key, value in pairs:
            path = f"$.model_args.{key}"
            if key == "trust_remote_code":
                remote_code = path if _set(value) else None  # the last one wins, as in a dict
                continue
            if not is_location_key(key):
                continue
            found = locate(value)
            if found is None:
                raise InvalidField(f"{key}={value!r} is neither an absolute path nor a hub id `org/name`", path=path)
            kind, where = found
            if kind is Kind.LOCAL:
                if not any(_under(where, root) for root in roots):
                    allowed = ", ".join(policy.model_roots) or "none (see `evalq setup --model-root`)"
                    raise InvalidField(
                        f"{key}={value!r} is not under a model root of pool {request.pool!r}; roots: {allowed}",
                        path=path,
                    )
                local_model = local_model or key in _MODEL_KEYS
                continue
            only_local = False
            if kind is Kind.URL and not _url_allowed(value, policy.url_prefixes):
                allowed = ", ".join(policy.url_prefixes) or "none (see `evalq setup --url-prefix`)"
                raise InvalidField(
                    f"{key}={value!r}: pool {request.pool!r} allows no such URL; prefixes: {allowed}", path=path
                )
            if kind is Kind.HUB and not _hub_allowed(value, policy.hub_prefixes):
                allowed = ", ".join(policy.hub_prefixes) or "none (see `evalq setup --hub-prefix`)"
                raise InvalidField(
                    f"{key}={value!r}: pool {request.pool!r} allows no such hub id; prefixes: {allowed}", path=path
                )
        if remote_code is not None and not policy.trust_remote_code and not (local_model and only_local):
            raise InvalidField(
                f"pool {request.pool!r} allows trust_remote_code only for a model named by a local path "
                "under its model roots (see `evalq setup --trust-remote-code`)",
                path=remote_code,
            )


def check(request: EvaluateRequest, policy: PoolPolicy) -> None:
    """Refuse (InvalidField, 422, with the JSON path) what `policy` does not allow.

    Pure: paths are compared lexically, since the gateway may not have them.
    """
    _checked(request, policy, _locate_lexically, normal_path)
    if request.timeout is not None and policy.max_timeout_s is not None and request.timeout > policy.max_timeout_s:
        raise InvalidField(
            f"timeout={request.timeout} s is over the limit of pool {request.pool!r}, {policy.max_timeout_s} s",
            path="$.timeout",
        )


def recheck(request: EvaluateRequest, policy: PoolPolicy, *, cwd: str | os.PathLike[str] | None = None) -> str | None:
    """A worker's check before it runs the job: why it must not run, or None.

    As `check`, but against this machine's disk: local paths and roots have their symlinks
    resolved, and a hub id or bare name that exists beside `cwd` (the evaluation's working
    folder; default this process's) is the local path it would load. The timeout is not
    checked here: `effective_timeout` caps it at the pool's maximum.
    """
    base = os.fspath(cwd) if cwd is not None else os.getcwd()

    def locate(value: str) -> tuple[Kind, str] | None:
        found = _locate_lexically(value)
        if found is None:
            return None
        kind, _ = found
        if kind is Kind.LOCAL or os.path.lexists(os.path.join(base, value)):
            return Kind.LOCAL, os.path.realpath(os.path.join(base, value))
        return found

    try:
        _checked(request, policy, locate, os.path.realpath)
    except InvalidField as exc:
        return f"{exc.message} (at `{exc.path}`)"
    roots = [os.path.realpath(root) for root in policy.model_roots]
    for pairs in _readings(request.model_args):
        for key, value in pairs:
            found = locate(value) if is_location_key(key) else None
            if found is not None and found[0] is Kind.LOCAL:
                leaving = _link_out_of(found[1], roots)
                if leaving is not None:
                    return (
                        f"{key}={value!r} holds {leaving}, a link that leads out of the model roots of pool "
                        f"{request.pool!r} (at `$.model_args.{key}`)"
                    )
    return None


# A model folder is walked to this many entries at most; one larger is refused, not half-checked.
_MAX_ENTRIES = 100_000


def _link_out_of(folder: str, roots: list[str]) -> str | None:
    """A link inside `folder` whose target is outside every root (the loader opens the files
    inside, not just the folder), or None. A folder too large to walk counts as one."""
    if not os.path.isdir(folder):
        return None
    seen = 0
    for here, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            seen += 1
            if seen > _MAX_ENTRIES:
                return f"more than {_MAX_ENTRIES} entries (too many to check)"
            path = os.path.join(here, name)
            if os.path.islink(path) and not any(_under(os.path.realpath(path), root) for root in roots):
                return os.path.relpath(path, folder)
    return None


def missing_model(request: EvaluateRequest) -> str | None:
    """Why the job cannot load its model here: an absolute model path with nothing there.

    A checkpoint submitted while training may be deleted (rotated away) before the job runs;
    lmms-eval would then fail with a loader's error that does not say so.
    """
    for pairs in _readings(request.model_args):
        for key, value in pairs:
            # Model keys only: a cache or output folder may rightly not exist yet.
            if key in _MODEL_KEYS and value.startswith("/") and not os.path.exists(value):
                return (
                    f"the checkpoint path {value} (model_args.{key}) does not exist on this worker: "
                    "was it deleted before the job ran?"
                )
    return None


def effective_cache(request: EvaluateRequest, policy: PoolPolicy) -> CacheMode:
    """How the job uses the response cache: its own `cache`, else its pool's default; a
    re-score neither reads nor writes it (it asks no model)."""
    if request.rescore_of is not None:
        return "off"
    return request.cache if request.cache is not None else policy.cache


def effective_timeout(request: EvaluateRequest, policy: PoolPolicy) -> int | None:
    """Seconds the job may run: its own timeout, else the pool's default, never over the pool's maximum."""
    timeout = request.timeout if request.timeout is not None else policy.default_timeout_s
    if policy.max_timeout_s is not None:
        timeout = policy.max_timeout_s if timeout is None else min(timeout, policy.max_timeout_s)
    return timeout


# --- storage -------------------------------------------------------------------------------


async def read_policy(kv: KeyValue, pool: str) -> PoolPolicy:
    """The pool's policy from the pools bucket; the default when it has none or it cannot be read."""
    try:
        entry = await kv.get(pool)
    except NotFoundError:  # no entry, or a deleted one
        return PoolPolicy()
    try:
        return decode_policy(entry.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Fail closed: the default lets through the least.
        log.warning("pool %s: unreadable policy (%s); using the default policy", pool, exc)
        return PoolPolicy()


async def load_policy(js: JetStreamContext, topology: Topology, pool: str) -> PoolPolicy:
    """The pool's policy as stored now (the default if the bucket or the entry is missing)."""
    try:
        kv = await js.key_value(topology.pools_bucket)
    except NotFoundError:
        return PoolPolicy()
    return await read_policy(kv, pool)


class Policies:
    """The gateway's view of the pools bucket: each pool's policy read at most every `max_age` s."""

    def __init__(self, kv: KeyValue, max_age: float = 2.0) -> None:
        self.kv = kv
        self.max_age = max_age
        self._cached: dict[str, tuple[float, PoolPolicy]] = {}
        self._reading: dict[str, asyncio.Task[PoolPolicy]] = {}

    async def get(self, pool: str) -> PoolPolicy:
        cached = self._cached.get(pool)
        if cached is not None and time.monotonic() - cached[0] <= self.max_age:
            return cached[1]
        reading = self._reading.get(pool)
        if reading is None or reading.done():
            # One read per pool at a time, shared by the requests that wait for it.
            reading = self._reading[pool] = asyncio.create_task(self._read(pool))
        return await asyncio.shield(reading)

    async def _read(self, pool: str) -> PoolPolicy:
        policy = await read_policy(self.kv, pool)
        self._cached[pool] = (time.monotonic(), policy)
        return policy


def _merged(base: dict[str, Any], changes: Mapping[str, object]) -> dict[str, Any]:
    """`base` with `changes` over it; a mapping over a mapping is merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        deeper = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if deeper else value  # type: ignore[arg-type]
    return out


def revised(base: PoolPolicy, **changes: object) -> PoolPolicy:
    """`base` with `changes`, validated (ValueError with the field's path if not a policy).
    `scheduling` and each of its `teams` are merged field by field (a new team starts from
    `TeamPolicy()`); a team given as None is removed (it then gets `default_team`)."""
    fields = _merged(msgspec.to_builtins(base), changes)
    if "model_roots" in changes:
        fields["model_roots"] = [normal_path(root) if root.startswith("/") else root for root in fields["model_roots"]]
    teams = fields["scheduling"]["teams"]
    fields["scheduling"]["teams"] = {name: team for name, team in teams.items() if team is not None}
    return msgspec.convert(fields, PoolPolicy)


async def store_policy(nc: Client, topology: Topology, pool: str, policy: PoolPolicy, *, timeout: float) -> None:
    """Write the pool's policy (what `evalq setup` does; no service writes it)."""
    await jetstream.publish(
        nc, jetstream.key_put(topology.pools_bucket, pool, msgspec.json.encode(policy)), timeout=timeout
    )


# --- evalq setup ---------------------------------------------------------------------------


class SetupChange(Struct, frozen=True, kw_only=True):
    """A setting `apply_setup` changed (or, in a dry run, would change); `--json` prints these."""

    object: str  # `stream X`, `consumer X/Y`, or `pool P`
    setting: str  # the setting's name; `policy` for a pool's whole policy
    was: Any
    now: Any


async def apply_setup(
    nc: Client,
    settings: Settings,
    pools: tuple[str, ...] = ("default",),
    *,
    policy: Mapping[str, object] | None = None,
    reset_policy: bool = False,
    dry_run: bool = False,
    force: bool = False,
) -> list[SetupChange]:
    """Apply the queue settings of `settings` and a policy to each of `pools`; returns what changed.

    The queue's objects are created where missing and given these settings where they differ
    (`Topology.apply`). A lower ack_wait is applied only once the pools' workers running a job
    have confirmed it (`renewal.confirm_lowering`: `renewal.Unconfirmed` otherwise, and nothing
    is changed; `force` applies it anyway). With `policy` (fields of `PoolPolicy` to set) or
    `reset_policy`, each pool's policy becomes its current one (or the default, with
    `reset_policy`) with `policy` merged over it (`revised`), and is written when it differs.
    With `dry_run`, nothing is written. A policy that is not valid raises `ValueError` or
    `msgspec.ValidationError` before anything is touched.
    """
    changes = dict(policy or {})
    revised(PoolPolicy(), **changes)
    timeout = settings.connection.request_timeout
    js = nc.jetstream(timeout=timeout, domain=settings.connection.js_domain)
    topology = Topology.from_settings(settings)

    async def confirm(lowering: dict[str, float]) -> None:
        domain = settings.connection.js_domain
        await confirm_lowering(nc, topology, lowering, timeout=timeout, domain=domain, force=force)

    found = await topology.apply(js, pools, dry_run=dry_run, confirm=confirm)
    done = [SetupChange(object=m.object, setting=m.setting, was=m.current, now=m.wanted) for m in found]
    for pool in pools if changes or reset_policy else ():
        current = await load_policy(js, topology, pool)
        wanted = revised(PoolPolicy() if reset_policy else current, **changes)
        if wanted == current:
            continue
        if not dry_run:
            await store_policy(nc, topology, pool, wanted, timeout=timeout)
        was, now = msgspec.to_builtins(current), msgspec.to_builtins(wanted)
        done.append(SetupChange(object=f"pool {pool}", setting="policy", was=was, now=now))
    return done
