"""Fault-injection fixtures: a nats-server of the test's own, which it may kill and restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evalq.config import Settings
from evalq.embedded import EmbeddedServer


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_settings(own_server: EmbeddedServer, settings: Settings) -> Settings:
    return settings.with_(nats_url=[own_server.url], request_timeout=3.0)


def figure(name: str, **counts: int) -> None:
    """The one-line figure each fault test prints (`pytest -s` or the CI log shows it)."""
    print(f"\n[{name}] " + ", ".join(f"{key} {value}" for key, value in counts.items()))
