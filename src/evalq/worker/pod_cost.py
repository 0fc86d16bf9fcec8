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
    def __init__(self, api: str, namespace: str, pod: str, *, token: str | None, tls: ssl.SSLContext | None) -> None:
        self.url = f"{api.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.token = token
        self.tls = tls
        self.cost: int | None = None  # the value last written

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
            api = f"https://{host}:{port}"
        token_file, ca_file = account / "token", account / "ca.crt"
        token = token_file.read_text().strip() if token_file.is_file() else None
        tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file.is_file() else None
        return cls(api, namespace, pod, token=token, tls=tls)

    async def show(self, busy: bool, *, timeout: float = 5.0) -> None:
        """Write the cost for `busy` if it changed; best effort."""
        cost = BUSY if busy else IDLE
        if cost == self.cost:
            return
        body = json.dumps({"metadata": {"annotations": {ANNOTATION: str(cost)}}}).encode()
        headers = {"Content-Type": "application/merge-patch+json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            status = await http.request("PATCH", self.url, body, headers, timeout=timeout, tls=self.tls)
        except (OSError, TimeoutError) as exc:
            log.warning("could not set the pod's deletion cost: %s", exc)
            return
        if 200 <= status < 300:
            self.cost = cost
        else:
            log.warning("could not set the pod's deletion cost: HTTP %d", status)
