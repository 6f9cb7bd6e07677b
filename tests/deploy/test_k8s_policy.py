"""The Kubernetes setup as a reviewer reads it: the restricted Pod Security Standard on
every pod, a read-only root filesystem, Redis behind a password, network policies that
match the ports, probes that keep the API ready while workers scale to zero, monitoring
objects that point at real ports."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cleandift.service.api.app import create_app
from cleandift.settings import Settings
from tests.deploy.test_deploy import KUSTOMIZATIONS, k8s_documents, kustomize

# Runs external programs (kubectl, promtool, pip, child processes): integration.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (restricted)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def pod_specs(documents=None):
    for name, doc in documents if documents is not None else k8s_documents():
        template = doc.get("spec", {}).get("template", {})
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield f"{name}:{doc['metadata']['name']}", template["spec"]
        if doc["kind"] == "RayJob":  # KubeRay: a head pod and each worker group's pods
            cluster = doc["spec"]["rayClusterSpec"]
            yield f"{name}:head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name}:{group['groupName']}", group["template"]["spec"]


def rendered(folder: str) -> list[tuple[str, dict]]:
    """A kustomization's objects as (where, object), like k8s_documents()."""
    return [(folder, doc) for doc in kustomize(folder)]


PODS = list(pod_specs())


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("where,pod", PODS, ids=[w for w, _ in PODS])
def test_every_pod_meets_the_restricted_pod_security_standard(where, pod):
    check_restricted(pod)


@pytest.mark.parametrize("where,pod", PODS, ids=[w for w, _ in PODS])
def test_writable_paths_are_volumes(where, pod):
    check_writable_paths(where, pod)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_rendered_pods_and_policies_follow_the_same_rules(folder):
    """The overlays' pods (a worker per model) as kustomize renders them."""
    docs = rendered(folder)
    pods = list(pod_specs(docs))
    assert len(pods) >= (3 if folder.endswith("sharded") else 4)  # sharded: no Redis pod
    for where, pod in pods:
        check_restricted(pod)
        check_writable_paths(where, pod)
    check_network_policies(docs)


def check_restricted(pod: dict) -> None:
    assert not (pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"))
    assert {k for v in pod.get("volumes", []) for k in v if k != "name"} <= RESTRICTED_VOLUMES
    pod_ctx = pod.get("securityContext", {})
    for container in containers(pod):
        ctx = container.get("securityContext", {})
        merged = {**pod_ctx, **ctx}
        assert merged.get("runAsNonRoot") is True, container["name"]
        assert merged.get("runAsUser", 1) != 0, container["name"]
        assert merged.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
        assert ctx.get("allowPrivilegeEscalation") is False, container["name"]
        assert not ctx.get("privileged"), container["name"]
        caps = ctx.get("capabilities", {})
        assert caps.get("drop") == ["ALL"], container["name"]
        assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}
        assert all("hostPort" not in port for port in container.get("ports", []))
        # Beyond the standard: nothing writes into the image; /tmp is an emptyDir.
        assert ctx.get("readOnlyRootFilesystem") is True, container["name"]
    assert pod.get("automountServiceAccountToken") is False  # no pod talks to the API server


def check_writable_paths(where: str, pod: dict) -> None:
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for container in containers(pod):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes
    if any(c["image"].startswith("cleandift/") for c in pod["containers"]):
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts or where.startswith("seed")


def test_redis_requires_a_password_and_every_client_sends_it():
    docs = dict(k8s_documents())
    [redis] = [d for d in yaml.safe_load_all((ROOT / "k8s/common/redis.yaml").read_text())
               if d["kind"] == "StatefulSet"][0]["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "noeviction" in args  # the job stream is never evicted
    urls = [e["value"] for _, pod in PODS for c in pod["containers"] for e in c.get("env", [])
            if e["name"] == "CLEANDIFT_REDIS_URL"]
    assert len(urls) >= 3  # api, worker, trainer
    assert all(u == "redis://:$(REDIS_PASSWORD)@$(REDIS_ADDRESS)/0" for u in urls)
    assert "REDIS_URL" not in docs["configmap.yaml"]["data"]  # no URL without the password


def test_api_readiness_does_not_depend_on_workers():
    """Workers scale to zero; API pods stay in the Service and answer 503 + Retry-After."""
    [api] = [pod for where, pod in PODS if where.startswith("api.yaml")]
    probe = api["containers"][0]["readinessProbe"]["httpGet"]["path"]
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert probe in app.openapi()["paths"]
    assert probe == "/readyz/api"


def container_ports(documents) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for _name, doc in documents:
        pod = doc.get("spec", {}).get("template", {})
        app = pod.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name")
        for c in pod.get("spec", {}).get("containers", []):
            out.setdefault(app, set()).update(p["containerPort"] for p in c.get("ports", []))
    return out


def test_network_policies_open_exactly_the_ports_pods_listen_on():
    check_network_policies(list(k8s_documents()))


def check_network_policies(documents: list[tuple[str, dict]]) -> None:
    ports = container_ports(documents)
    policies = [doc for _, doc in documents if doc["kind"] == "NetworkPolicy"]
    covered = set()
    for policy in policies:
        app = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        covered.add(app)
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert opened == ports.get(app, set()), app  # (the seed job: applied on its own)
    redis = {"redis"} if any(doc["kind"] == "StatefulSet" for _, doc in documents) else set()
    assert covered == {"cleandift-api", "cleandift-worker", "cleandift-trainer",
                       "cleandift-seed"} | redis  # no redis: a cluster of the user's own


def test_pod_monitors_scrape_named_ports_that_exist():
    named = {}
    for _, doc in k8s_documents():
        pod = doc.get("spec", {}).get("template", {})
        app = pod.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name")
        for c in pod.get("spec", {}).get("containers", []):
            named.setdefault(app, set()).update(p.get("name") for p in c.get("ports", []))
    monitors = [doc for _, doc in k8s_documents() if doc["kind"] == "PodMonitor"]
    assert len(monitors) == 2
    for monitor in monitors:
        app = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in named[app] and endpoint["path"] == "/metrics"
