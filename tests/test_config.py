"""Settings: defaults < env < TOML < flags, one Struct, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalq.config import Settings, load_settings
from evalq.errors import ConfigError


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.nats_url == ["nats://127.0.0.1:4222"]
    assert settings.prefix == "evalq"


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
    assert settings.nats_url == ["nats://a:1", "nats://b:2"]
    assert settings.prefix == "fromtoml"  # TOML over env
    assert settings.replicas == 5  # flags over TOML
    assert settings.max_attempts == 7
    assert settings.advertise_inventory is False
    assert settings.task_paths == ["/x", "/y"]
    assert settings.pool == "default"  # a None flag changes nothing


def test_explicit_config_file(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('[evalq]\nnats_url = "nats://c:3"\n')
    assert load_settings(config=path, environ={}).nats_url == ["nats://c:3"]


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
