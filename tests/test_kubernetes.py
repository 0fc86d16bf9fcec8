"""The Kubernetes manifests, rendered and checked without a cluster: every object parses, every
Secret, key and service account a pod names exists, probes point at the port the process
serves them on, the scaler names the stream and consumer that the queue creates, and a
worker's grace period outlasts its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from evalq.config import Settings
from evalq.topology import Topology

from .test_deploy import DEPLOY

K8S = DEPLOY / "kubernetes"


def render() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` applies: each listed file's objects, in the
    kustomization's namespace."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        for obj in yaml.safe_load_all((K8S / name).read_text()):
            assert obj and {"apiVersion", "kind", "metadata"} <= set(obj), f"{name}: not an object"
            assert obj["metadata"].get("name"), f"{name}: an object without a name"
            objects.append(obj)
    assert kustomization["namespace"] == "evalq"
    return objects


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for deployment in of_kind(objects, "Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_every_secret_key_and_account_a_pod_names_exists() -> None:
    objects = render()
    secrets = of_kind(objects, "Secret")
    for deployment, container in containers(objects):
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secrets, f"{deployment['metadata']['name']}: no Secret {ref['name']}"
                assert ref["key"] in secrets[ref["name"]]["stringData"], f"no key {ref['key']} in {ref['name']}"
        account = deployment["spec"]["template"]["spec"].get("serviceAccountName")
        if account:
            assert account in of_kind(objects, "ServiceAccount")
    bindings = of_kind(objects, "RoleBinding")
    assert all(b["roleRef"]["name"] in of_kind(objects, "Role") for b in bindings.values())


def test_probes_and_metrics_point_at_the_port_each_process_serves() -> None:
    for deployment, container in containers(render()):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = env_of(container)
        assert int(env["EVALQ_METRICS_PORT"]) == ports["metrics"]
        assert env["EVALQ_METRICS_HOST"] == "0.0.0.0", "a probe from the kubelet must reach the port"
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            http = container[probe]["httpGet"]
            assert (http["path"], http["port"]) == (path, "metrics"), deployment["metadata"]["name"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == env["EVALQ_METRICS_PORT"]


def test_the_scaler_names_the_pools_stream_and_consumer_and_scale_down_spares_busy_pods() -> None:
    objects = render()
    deployments = of_kind(objects, "Deployment")
    topology = Topology.from_settings(Settings())
    scaled = of_kind(objects, "ScaledObject")
    assert scaled
    for scaler in scaled.values():
        target = deployments[scaler["spec"]["scaleTargetRef"]["name"]]
        (worker,) = target["spec"]["template"]["spec"]["containers"]
        pool = env_of(worker)["EVALQ_POOL"]
        triggers = {t["type"]: t["metadata"] for t in scaler["spec"]["triggers"]}
        nats = triggers["nats-jetstream"]
        assert (nats["stream"], nats["consumer"]) == (topology.work_stream(pool), topology.consumer)
        assert nats["account"] == "EVALQ"
        assert f'pool="{pool}"' in triggers["prometheus"]["query"]
        # The grace period outlasts the worker's own, so a stopping pod hands its job back.
        grace = int(env_of(worker)["EVALQ_GRACE"])
        assert target["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
        assert target["spec"]["template"]["spec"]["serviceAccountName"] == "evalq-worker"
        env_names = {e["name"] for e in worker["env"]}
        assert {"EVALQ_POD_NAME", "EVALQ_POD_NAMESPACE"} <= env_names
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    (role,) = of_kind(objects, "Role").values()
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]


def test_gateways_two_with_a_disruption_budget_and_nats_three_with_monitoring() -> None:
    objects = render()
    gateway = of_kind(objects, "Deployment")["evalq-gateway"]
    assert gateway["spec"]["replicas"] == 2
    (budget,) = of_kind(objects, "PodDisruptionBudget").values()
    assert budget["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    assert values["config"]["cluster"]["replicas"] == 3 and values["config"]["jetstream"]["enabled"]
    (scaler,) = of_kind(objects, "ScaledObject").values()
    endpoint = next(t for t in scaler["spec"]["triggers"] if t["type"] == "nats-jetstream")["metadata"]
    assert endpoint["natsServerMonitoringEndpoint"].endswith(f":{values['config']['monitor']['port']}")
    for _, container in containers(objects):
        assert env_of(container).get("EVALQ_REPLICAS", "3") == "3"
