"""Settings: one Struct, read from defaults, then `EVALQ_*` env, then TOML, then flags.

Precedence, lowest first: defaults < environment < TOML file < command-line flags.
The TOML file is `--config PATH`, else `$EVALQ_CONFIG`, else `./evalq.toml` if it
exists; its keys live in an `[evalq]` table and use the field names below.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import ConfigError

__all__ = ["Settings", "load_settings"]

DEFAULT_URL = "nats://127.0.0.1:4222"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Connection
    nats_url: list[str] = msgspec.field(default_factory=lambda: [DEFAULT_URL])
    creds: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 10.0
    # Topology
    prefix: str = "evalq"
    replicas: int = 1
    queue_limit: int = 1_000_000
    events_max_age_days: float = 30.0
    events_per_subject: int = 1000
    duplicate_window: float = 300.0
    idempotency_ttl: float = 24 * 3600.0
    # Local state
    home: str = "~/.local/share/evalq"
    # Gateway
    max_request_bytes: int = 512 * 1024
    gateway_concurrency: int = 512
    # Worker
    pool: str = "default"
    task_paths: list[str] = []
    ack_wait: float = 60.0
    max_attempts: int = 3
    heartbeat: float = 5.0
    grace: float = 30.0
    cancel_grace: float = 10.0
    shutdown_mode: Literal["finish", "requeue"] = "finish"
    progress_interval: float = 2.0
    log_tail_lines: int = 40
    # How long a worker keeps retrying a job's bookkeeping while NATS is unreachable.
    outage_timeout: float = 600.0
    worker_id: str | None = None
    # The command that runs one evaluation; empty means `python -m lmms_eval`.
    evaluator: list[str] = []
    # Fork single-GPU jobs from a process that has already imported lmms-eval (Linux, and
    # only when `evaluator` is empty); off, every job starts a fresh `python -m lmms_eval`.
    warm_evaluator: bool = True
    advertise_inventory: bool = True
    handle_signals: bool = True

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()

    @property
    def results_root(self) -> Path:
        return self.home_path / "results"

    def with_(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)


_LISTS = {"nats_url": ",", "task_paths": os.pathsep, "evaluator": " "}
_FIELDS = {f.name: f for f in msgspec.structs.fields(Settings)}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _FIELDS:
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
    values = dict(table)
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
    try:
        # Env values arrive as strings: strict=False lets "3" become 3 and "true" True.
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from None
