"""A worker pod's deletion cost: low while idle, high while it holds a job, so that a scale-down
of its Deployment removes idle pods first (Kubernetes reads the pod's
`controller.kubernetes.io/pod-deletion-cost` annotation when it picks which pod to remove).

Only in a pod: the worker learns its name and namespace from `EVALQ_POD_NAME` and
`EVALQ_POD_NAMESPACE` (the Deployment sets them from the downward API) and talks to the API
server with its service account's token, as a merge-patch of its own pod (the Role in
deploy/kubernetes allows `patch` on pods and nothing else). `EVALQ_KUBE_API` names another
API server (tests). A failure is logged, never fatal: the worker runs jobs all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from .. import http

__all__ = ["ANNOTATION", "BUSY", "IDLE", "PodCost"]

log = logging.getLogger("evalq.worker")

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
IDLE, BUSY = 0, 1000
_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class PodCost:
    def __init__(
        self, api: str, namespace: str, pod: str, *, token_file: Path | None, tls: ssl.SSLContext | None
    ) -> None:
        self.url = f"{api.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.token_file = token_file
        self.tls = tls
        self.cost: int | None = None  # the value last written
        self.wanted: int | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, account: Path = _ACCOUNT) -> PodCost | None:
        """The pod's cost keeper, or None outside a pod (no `EVALQ_POD_NAME`)."""
        pod, namespace = environ.get("EVALQ_POD_NAME"), environ.get("EVALQ_POD_NAMESPACE", "default")
        if not pod:
            return None
        api = environ.get("EVALQ_KUBE_API")
        if api is None:
            host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                log.warning("EVALQ_POD_NAME is set but no API server is known; the pod's deletion cost is not kept")
                return None
            api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        ca_file = account / "ca.crt"
        tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file.is_file() else None
        return cls(api, namespace, pod, token_file=account / "token", tls=tls)

    def want(self, busy: bool) -> None:
        """Have the cost say `busy` (or idle), written in the background: a slow or absent API
        server delays no job. Called again at every heartbeat, so a write that failed is retried."""
        self.wanted = BUSY if busy else IDLE
        if self.wanted != self.cost and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._write(), name="pod-deletion-cost")

    async def close(self, timeout: float = 5.0) -> None:
        """Let a write under way finish (the last word, idle, is the one a scale-down reads), bounded."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout)

    async def _write(self, timeout: float = 5.0) -> None:
        while self.wanted is not None and self.wanted != self.cost:
            cost = self.wanted
            body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(cost)}}}).encode()
            headers = {"Content-Type": "application/merge-patch+json", "Accept": "application/json"}
            try:
                # Read at each write: a projected service-account token is rotated.
                if self.token_file is not None and self.token_file.is_file():
                    headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
                status = await http.request("PATCH", self.url, body, headers, timeout=timeout, tls=self.tls)
            except Exception as exc:  # never fatal: the worker runs jobs all the same
                log.warning("could not set the pod's deletion cost: %s", exc)
                return
            if not 200 <= status < 300:
                log.warning("could not set the pod's deletion cost: HTTP %d", status)
                return
            self.cost = cost
