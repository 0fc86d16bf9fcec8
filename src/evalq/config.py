"""Settings, one typed Struct per role, read from defaults, `EVALQ_*` env, TOML, then flags.

::

    Settings
    ├── connection   ConnectionSettings  how every process reaches NATS
    ├── queue        QueueSettings       the shared JetStream objects (see `Topology`)
    ├── gateway      GatewaySettings     the `evalq gateway` service
    ├── worker       WorkerSettings      the `evalq worker` service
    ├── ui           UiSettings          the web process (`evalq ui`, and `evalq up`'s)
    ├── home                             this machine's evalq folder
    └── handle_signals                   SIGTERM/SIGINT stop the service (off when embedded)

Every field has one name, unique across roles, so each source can stay flat: the env
variable is `EVALQ_<NAME>`, the TOML key is `<name>` in an `[evalq]` table (or in
`[evalq.<role>]`), the flag is `--<name>`. Precedence, lowest first: defaults < environment <
TOML file < command-line flags. The TOML file is `--config PATH`, else `$EVALQ_CONFIG`, else
`./evalq.toml` if it exists. Each field is documented once, here, in its `Meta`; README's
configuration table is generated from these (`python -m evalq.config`).

The queue settings describe objects that every process shares. The first process to start
creates them with its values; later processes with other values do not rewrite them, they
log the difference (`Topology.ensure`), and `evalq setup` applies a change on purpose.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import ConfigError

__all__ = [
    "ConnectionSettings",
    "GatewaySettings",
    "QueueSettings",
    "Settings",
    "UiSettings",
    "WorkerSettings",
    "load_settings",
    "settings_table",
]

DEFAULT_URL = "nats://127.0.0.1:4222"
Seconds = Annotated[float, Meta(gt=0)]


def _doc(text: str) -> Meta:
    return Meta(description=text)


class ConnectionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nats_url: Annotated[list[str], _doc("server URLs, comma-separated (a cluster lists several)")] = msgspec.field(
        default_factory=lambda: [DEFAULT_URL]
    )
    creds: Annotated[str | None, _doc("a NATS `.creds` file")] = None
    user: Annotated[str | None, _doc("NATS user name (with `password`)")] = None
    password: Annotated[str | None, _doc("NATS password")] = None
    token: Annotated[str | None, _doc("NATS token")] = None
    nkey_seed: Annotated[str | None, _doc("a file holding an NKey seed")] = None
    tls_ca: Annotated[str | None, _doc("CA certificate that signs the server's")] = None
    tls_cert: Annotated[str | None, _doc("client certificate (with `tls_key`)")] = None
    tls_key: Annotated[str | None, _doc("client certificate's key")] = None
    connect_timeout: Annotated[Seconds, _doc("seconds to wait for a server when connecting")] = 5.0
    request_timeout: Annotated[Seconds, _doc("seconds to wait for any reply (gateway, JetStream)")] = 10.0
    js_domain: Annotated[str | None, _doc("the server's JetStream domain; API requests go to `$JS.<domain>.API`")] = (
        None
    )
    metrics_port: Annotated[
        Annotated[int, Meta(ge=0, le=65535)] | None,
        _doc("this process's Prometheus `/metrics`, `/healthz` and `/readyz` port; off when unset"),
    ] = None
    metrics_host: Annotated[str, _doc("the address the metrics port listens on")] = "127.0.0.1"
    inbox_prefix: Annotated[
        str,
        Meta(
            pattern=r"\A[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\Z",
            description="subject prefix of this process's reply inboxes; with deploy/nats each user has its own",
        ),
    ] = "_INBOX"


class QueueSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    prefix: Annotated[
        str, Meta(pattern=r"\A[A-Za-z0-9_\-]+\Z", description="subject prefix; streams and buckets derive from it")
    ] = "evalq"
    replicas: Annotated[int, Meta(ge=1, le=5, description="JetStream replicas for every stream and bucket")] = 1
    queue_limit: Annotated[
        int, Meta(ge=1, description="jobs a pool holds; a full queue answers 503 and drops nothing")
    ] = 1_000_000
    ack_wait: Annotated[
        Seconds,
        _doc(
            "seconds without a sign of life before a held job is redelivered; "
            "a running job's worker renews it every ack_wait/4"
        ),
    ] = 12.0
    events_max_age_days: Annotated[float, Meta(gt=0, description="how long events are kept")] = 30.0
    events_per_subject: Annotated[int, Meta(ge=1, description="events kept per job and event type")] = 1000
    journal_max_age_days: Annotated[
        float, Meta(gt=0, description="how long a completed job's response journal is kept for `evalq rescore`")
    ] = 7.0
    cache_max_age_days: Annotated[float, Meta(gt=0, description="how long a cached model response is kept")] = 30.0
    cache_max_bytes: Annotated[
        int, Meta(ge=-1, description="bytes the response cache may hold, oldest dropped first; -1: no limit")
    ] = -1
    duplicate_window: Annotated[Seconds, _doc("seconds in which a re-sent message id is dropped")] = 300.0
    idempotency_ttl: Annotated[Seconds, _doc("seconds an Idempotency-Key is remembered")] = 24 * 3600.0


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_request_bytes: Annotated[int, Meta(ge=1, description="larger submissions are refused with 413")] = 512 * 1024
    gateway_concurrency: Annotated[int, Meta(ge=1, description="requests one gateway serves at once")] = 512
    webhook_hosts: Annotated[
        list[str], _doc("hosts beyond loopback that an admin may point a webhook at (`evalq notify add`)")
    ] = []
    notify_attempts: Annotated[
        int, Meta(ge=1, le=100, description="tries of one webhook delivery before it is kept as a failure")
    ] = 10
    notify_timeout: Annotated[Seconds, _doc("seconds one webhook POST may take")] = 10.0


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pool: Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_\-]+\Z", description="the pool a worker serves")] = "default"
    task_paths: Annotated[list[str], _doc("extra lmms-eval task folders (`os.pathsep`-separated)")] = []
    max_attempts: Annotated[
        int, Meta(ge=1, description="starts before a job is failed (a hand-back before a start is not one)")
    ] = 3
    heartbeat: Annotated[Seconds, _doc("seconds between registry writes; an entry lives three of them")] = 5.0
    grace: Annotated[Seconds, _doc("seconds a stopping worker lets its job finish (`shutdown_mode` finish)")] = 30.0
    cancel_grace: Annotated[Seconds, _doc("seconds between SIGTERM and SIGKILL when a running job is cancelled")] = 10.0
    shutdown_mode: Annotated[
        Literal["finish", "requeue"], _doc("on SIGTERM: finish the job within `grace`, or hand it back at once")
    ] = "finish"
    progress_interval: Annotated[Seconds, _doc("seconds between progress events within one phase")] = 2.0
    log_tail_lines: Annotated[int, Meta(ge=0, description="log lines a `failed` event carries")] = 40
    outage_timeout: Annotated[
        Seconds, _doc("seconds a worker retries a job's bookkeeping while NATS is unreachable")
    ] = 600.0
    worker_id: Annotated[str | None, _doc("the worker's name in the registry (default: host-pid-random)")] = None
    evaluator: Annotated[list[str], _doc("the command that runs one evaluation (default `python -m lmms_eval`)")] = []
    warm_evaluator: Annotated[
        bool, _doc("fork single-GPU jobs from a process with lmms-eval imported (Linux; no `evaluator`)")
    ] = True
    advertise_inventory: Annotated[
        bool, _doc("list models and tasks in the registry; the worker is listed once it has them")
    ] = True
    resident_model: Annotated[
        bool, _doc("keep the last job's model loaded for the next job with the same model (single-GPU, warm)")
    ] = True
    journal_flush_records: Annotated[
        int, Meta(ge=1, description="records an evaluation buffers before it writes them to its journal")
    ] = 256
    journal_flush_seconds: Annotated[
        Seconds, _doc("seconds an evaluation's journal records wait at most before they are written (and kept)")
    ] = 5.0
    resident_idle: Annotated[
        Seconds | None, _doc("seconds an idle resident model is kept (default: until another model is needed)")
    ] = None


class UiSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ui_host: Annotated[str, _doc("address the web process binds; anything but loopback requires `ui_token`")] = (
        "127.0.0.1"
    )
    ui_port: Annotated[
        int, Meta(ge=0, le=65535, description="the web process's port (0: any free one; `evalq up` falls back to one)")
    ] = 8642
    ui_token: Annotated[
        str | None,
        _doc("token the web process requires (HTTP Bearer, or Basic with it as password); required off loopback"),
    ] = None
    lmms_eval_api: Annotated[
        bool, _doc("serve lmms-eval's server API (`/evaluate`, `/jobs/...`); `evalq up` turns it on")
    ] = False
    ui_allow_cancel: Annotated[
        bool, _doc("show a cancel button on the dashboard's job pages (read-only otherwise)")
    ] = False
    ui_allowed_hosts: Annotated[
        list[Annotated[str, Meta(pattern=r"\A(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)(:[0-9]{1,5})?\Z")]],
        _doc(
            "`Host` names the web process answers besides its bind address (and localhost on loopback), "
            "comma-separated: a proxy's name; `name` for any port, `name:port` for one"
        ),
    ] = []
    ui_public_url: Annotated[
        Annotated[str, Meta(pattern=r"\Ahttps?://[^/?#\s]+(/[^?#\s]*)?\Z")] | None,
        _doc(
            "the web process's URL as its clients reach it, for the result URLs it gives out "
            "(default `http://<ui_host>:<port>`, or the machine's name when bound to all addresses)"
        ),
    ] = None


_ROLES: dict[str, type[msgspec.Struct]] = {
    "connection": ConnectionSettings,
    "queue": QueueSettings,
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
    "ui": UiSettings,
}
_PROCESS_FIELDS = ("home", "handle_signals")
# field name -> its role ("" for the process-wide fields)
_ROLE_OF: dict[str, str] = {
    field.name: role for role, struct in _ROLES.items() for field in msgspec.structs.fields(struct)
} | {name: "" for name in _PROCESS_FIELDS}


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a process may need; each service reads its own role's part.

    Build one from flat names with `Settings.of(ack_wait=30, nats_url=[...])`; `with_()`
    takes flat names too.
    """

    connection: ConnectionSettings = msgspec.field(default_factory=ConnectionSettings)
    queue: QueueSettings = msgspec.field(default_factory=QueueSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    ui: UiSettings = msgspec.field(default_factory=UiSettings)
    home: Annotated[str, _doc("this machine's evalq folder: embedded server store, worker results")] = (
        "~/.local/share/evalq"
    )
    handle_signals: Annotated[bool, _doc("SIGTERM/SIGINT stop the service (off for tests and embedding)")] = True

    @classmethod
    def of(cls, **values: Any) -> Settings:
        """Settings from flat field names; raises ConfigError for an unknown name or a bad value."""
        nested: dict[str, Any] = {role: {} for role in _ROLES}
        for name, value in values.items():
            role = _ROLE_OF.get(name)
            if role is None:
                raise ConfigError(f"unknown setting {name!r}")
            if role:
                nested[role][name] = value
            else:
                nested[name] = value
        try:
            # Env values arrive as strings: strict=False lets "3" become 3 and "true" True.
            return msgspec.convert(nested, Settings, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid setting: {exc}") from None

    def flat(self) -> dict[str, Any]:
        values: dict[str, Any] = {name: getattr(self, name) for name in _PROCESS_FIELDS}
        for role in _ROLES:
            values.update(msgspec.structs.asdict(getattr(self, role)))
        return values

    def with_(self, **changes: Any) -> Settings:
        return Settings.of(**{**self.flat(), **changes})

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()

    @property
    def results_root(self) -> Path:
        return self.home_path / "results"


_LISTS = {"nats_url": ",", "task_paths": os.pathsep, "evaluator": " ", "ui_allowed_hosts": ","}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _ROLE_OF:
        raw = environ.get(f"EVALQ_{name.upper()}")
        if raw is None or raw == "":
            continue
        values[name] = [part for part in raw.split(_LISTS[name]) if part] if name in _LISTS else raw
    return values


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    table = data.get("evalq", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [evalq] must be a table")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in _ROLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [evalq.{key}] must be a table")
            for name in value:
                if _ROLE_OF.get(name) != key:
                    raise ConfigError(f"{path}: {name!r} is not a {key} setting")
            values.update(value)
        else:
            values[key] = value
    for name, sep in _LISTS.items():
        if isinstance(values.get(name), str):
            values[name] = [part for part in values[name].split(sep) if part]
    return values


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults, env, TOML and flags (None values in flags are ignored)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = _from_env(environ)
    path = config or environ.get("EVALQ_CONFIG")
    if path:
        merged.update(_from_toml(Path(path)))
    elif Path("evalq.toml").is_file():
        merged.update(_from_toml(Path("evalq.toml")))
    for key, value in (flags or {}).items():
        if value is not None:
            merged[key] = value
    return Settings.of(**merged)


def _describe(struct: type[msgspec.Struct]) -> list[tuple[str, str, str]]:
    """(name, default, meaning) for each field, read from the Struct itself."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    rows = []
    for field in info.fields:
        meaning = ""
        kind = field.type
        while isinstance(kind, msgspec.inspect.Metadata):
            meaning = meaning or (kind.extra_json_schema or {}).get("description", "")
            meaning = kind.extra.get("description", meaning) if kind.extra else meaning
            kind = kind.type
        default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
        rows.append((field.name, _show(default), meaning))
    return rows


def _show(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, list):
        return "`" + ",".join(map(str, value)) + "`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def settings_table() -> str:
    """README's configuration table, in Markdown, generated from the Structs above."""
    lines = ["| role | setting (env `EVALQ_<NAME>`) | default | meaning |", "|---|---|---|---|"]
    for role, struct in _ROLES.items():
        for name, default, meaning in _describe(struct):
            lines.append(f"| {role} | `{name}` | {default} | {meaning} |")
    for name, default, meaning in _describe(Settings):
        if name in _PROCESS_FIELDS:
            lines.append(f"| process | `{name}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_table())
