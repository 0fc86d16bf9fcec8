"""The embedded nats-server: starts on loopback, keeps its store, stops cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from evalq import embedded
from evalq.config import Settings
from evalq.connection import connect
from evalq.embedded import EmbeddedServer
from evalq.errors import ConnectError, ServerNotFound


async def test_store_survives_a_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "store")
    server.start()
    try:
        assert server.url.startswith("nats://127.0.0.1:")
        nc = await connect(Settings.of(nats_url=[server.url]))
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.one", b"1")
        await nc.close()
    finally:
        server.stop()
    assert server.process is None

    again = EmbeddedServer(tmp_path / "store")
    again.start()
    try:
        nc = await connect(Settings.of(nats_url=[again.url]))
        info = await nc.jetstream().stream_info("KEEP")
        assert info.state.messages == 1
        await nc.close()
    finally:
        again.stop()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerNotFound, match="evalq\\[server\\]"):
        embedded.find_nats_server()


def test_found_beside_the_interpreter() -> None:
    assert os.access(embedded.find_nats_server(), os.X_OK)


async def test_unreachable_server_gives_a_hint() -> None:
    with pytest.raises(ConnectError, match="evalq up"):
        await connect(Settings.of(nats_url=["nats://127.0.0.1:1"], connect_timeout=1))
