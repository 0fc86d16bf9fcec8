"""Settings: defaults < env < TOML < flags, one Struct, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalq.config import Settings, load_settings, settings_table
from evalq.errors import ConfigError


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.connection.nats_url == ["nats://127.0.0.1:4222"]
    assert settings.queue.prefix == "evalq"


def test_env_then_toml_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "evalq.toml"
    toml.write_text('[evalq]\nprefix = "fromtoml"\nreplicas = 3\n')
    env = {
        "EVALQ_NATS_URL": "nats://a:1,nats://b:2",
        "EVALQ_PREFIX": "fromenv",
        "EVALQ_MAX_ATTEMPTS": "7",
        "EVALQ_ADVERTISE_INVENTORY": "false",
        "EVALQ_TASK_PATHS": "/x:/y",
    }
    settings = load_settings({"replicas": 5, "pool": None}, environ=env)
    assert settings.connection.nats_url == ["nats://a:1", "nats://b:2"]
    assert settings.queue.prefix == "fromtoml"  # TOML over env
    assert settings.queue.replicas == 5  # flags over TOML
    assert settings.worker.max_attempts == 7
    assert settings.worker.advertise_inventory is False
    assert settings.worker.task_paths == ["/x", "/y"]
    assert settings.worker.pool == "default"  # a None flag changes nothing


def test_explicit_config_file(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[evalq]\nnats_url = "nats://c:3"\n')
    assert load_settings(config=path, environ={}).connection.nats_url == ["nats://c:3"]


@pytest.mark.parametrize(
    ("environ", "text"),
    [
        ({"EVALQ_REPLICAS": "three"}, "replicas"),
        ({"EVALQ_SHUTDOWN_MODE": "sometime"}, "shutdown_mode"),
        ({"EVALQ_CONFIG": "/nonexistent/evalq.toml"}, "not found"),
    ],
)
def test_bad_settings_are_one_clear_error(
    environ: dict[str, str], text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=text):
        load_settings(environ=environ)


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "evalq.toml"
    path.write_text("[evalq\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config=path, environ={})


def test_role_tables_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "evalq.toml"
    path.write_text(
        '[evalq]\nprefix = "q"\n[evalq.worker]\npool = "big"\nheartbeat = 2.5\n[evalq.queue]\nack_wait = 30\n'
    )
    settings = load_settings(config=path, environ={})
    assert (settings.queue.prefix, settings.worker.pool, settings.worker.heartbeat) == ("q", "big", 2.5)
    assert settings.queue.ack_wait == 30.0
    path.write_text('[evalq.gateway]\npool = "big"\n')
    with pytest.raises(ConfigError, match="not a gateway setting"):
        load_settings(config=path, environ={})


def test_flat_names_route_to_their_role() -> None:
    settings = Settings.of(ack_wait=9, max_request_bytes=10, request_timeout=2, pool="p", home="/h")
    assert settings.queue.ack_wait == 9.0 and settings.gateway.max_request_bytes == 10
    assert settings.connection.request_timeout == 2.0 and settings.worker.pool == "p"
    assert settings.with_(pool="q").worker.pool == "q" and settings.with_(pool="q").queue.ack_wait == 9.0
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        Settings.of(nope=1)
    with pytest.raises(ConfigError, match="heartbeat"):
        Settings.of(heartbeat=0)


def test_every_setting_is_documented_once_and_the_readme_table_matches() -> None:
    table = settings_table()
    names = [row.split("|")[2].strip().strip("`") for row in table.splitlines()[2:]]
    assert len(names) == len(set(names)) == len(Settings().flat())
    for row in table.splitlines()[2:]:
        assert row.split("|")[4].strip(), f"undocumented setting: {row}"
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    begin, end = "<!-- settings-table:begin -->\n", "<!-- settings-table:end -->"
    assert begin in readme and end in readme
    generated = readme.split(begin, 1)[1].split(end, 1)[0]
    assert generated == table, "README's table is stale: run `make docs`"


@pytest.mark.parametrize("name", ["prefix", "pool"])
def test_a_name_with_a_trailing_newline_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.of(**{name: "evalq\n"})
