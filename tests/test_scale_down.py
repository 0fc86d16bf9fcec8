"""Scale-down that never kills a busy worker's work: a worker pod keeps its deletion cost low
while idle and high while busy (seen here by a stand-in API server on loopback), and one
stopped mid-job with a grace period shorter than the job hands it back, to complete on
another worker with no second run beside it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from evalq import AsyncClient
from evalq.config import Settings
from evalq.schemas import Completed, Requeued, Started
from evalq.worker.pod_cost import ANNOTATION, BUSY, IDLE, PodCost

from .conftest import Processes
from .events import all_events
from .test_embedded import free_port
from .waiting import eventually

pytestmark = pytest.mark.slow

TIMED = str(Path(__file__).parent / "timed_evaluator.sh")


@dataclass
class ApiServer:
    """Records the merge-patches of pods; answers 200."""

    port: int
    patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path = head[0].split()[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "PATCH" and headers.get("content-type") == "application/merge-patch+json":
                self.patches.append((path, json.loads(body)))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
        finally:
            writer.close()

    def costs(self, pod: str) -> list[int]:
        return [
            int(patch["metadata"]["annotations"][ANNOTATION])
            for path, patch in self.patches
            if path == f"/api/v1/namespaces/evals/pods/{pod}"
        ]

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[ApiServer]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        try:
            yield self
        finally:
            server.close()


async def test_a_pod_stopped_mid_job_hands_it_back_and_says_busy_or_idle(
    client: AsyncClient, settings: Settings, processes: Processes
) -> None:
    api = ApiServer(free_port())
    env = {"EVALQ_EVALUATOR": TIMED, "EVALQ_GRACE": "1", "EVALQ_SHUTDOWN_MODE": "finish"}
    pod = {
        "EVALQ_POD_NAME": "worker-a",
        "EVALQ_POD_NAMESPACE": "evals",
        "EVALQ_KUBE_API": f"http://127.0.0.1:{api.port}",
    }
    async with api.serving():
        first = processes.worker(settings, **env, **pod)
        await eventually(
            lambda: api.costs("worker-a"), until=lambda c: c == [IDLE], what="the idle pod's cost", timeout=60
        )
        # A job three times longer than the grace period.
        accepted = await client.submit(model="dummy", tasks=["fake"], model_args={"seconds": 6})
        await eventually(lambda: api.costs("worker-a"), until=lambda c: c[-1:] == [BUSY], what="busy", timeout=60)
        info = await client.get_job(accepted.job_id)
        assert info.status == "running"
        processes.worker(settings, **env)  # the pod that stays
        first.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.to_thread(first.wait), 60)
        done = await client.wait_for_job(accepted.job_id, timeout=120)
    assert done.status == "completed" and done.attempts == 2
    # Busy while it held the job, idle again once it handed it back.
    assert api.costs("worker-a") == [IDLE, BUSY, IDLE]
    events = await all_events(client, accepted.job_id)
    started = [e for e in events if isinstance(e, Started)]
    requeued = [e for e in events if isinstance(e, Requeued)]
    assert len(started) == 2 and started[0].worker != started[1].worker
    # No second run beside the first: the hand-back came before the other worker started.
    assert requeued and requeued[0].time <= started[1].time
    assert sum(isinstance(e, Completed) for e in events) == 1


def test_the_api_server_is_found_from_the_pods_environment(tmp_path: Path) -> None:
    assert PodCost.from_env({}, account=tmp_path) is None
    ipv6 = PodCost.from_env({"EVALQ_POD_NAME": "w", "KUBERNETES_SERVICE_HOST": "fd00::1"}, account=tmp_path)
    assert ipv6 is not None and ipv6.url == "https://[fd00::1]:443/api/v1/namespaces/default/pods/w"
    env = {"EVALQ_POD_NAME": "w", "EVALQ_POD_NAMESPACE": "evals", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    ipv4 = PodCost.from_env(env, account=tmp_path)
    assert ipv4 is not None and ipv4.url == "https://10.0.0.1:443/api/v1/namespaces/evals/pods/w"
