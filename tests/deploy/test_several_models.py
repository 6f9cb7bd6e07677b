"""Several models from one deployment (docs/deploy.md, "Several models"): the kustomize
overlay k8s/overlays/two-models and docker-compose.two-models.yml give each served model
its own workers on its own queue, and the API the names. Checked against the code: the
settings the rendered environments give, the fleet the API builds from them, the Redis
keys each worker and each KEDA trigger use."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import yaml

from cleandift.service.fleet import fleet_of
from cleandift.service.queue.keys import Keys
from cleandift.settings import Settings
from tests.deploy.test_deploy import ROOT, kustomize, load_compose, merge, untag

# Runs external programs (kubectl, promtool, pip, child processes): integration.
pytestmark = pytest.mark.integration

OVERLAY = "k8s/overlays/two-models"
MODEL_LABEL = "cleandift.io/model"
APP_LABEL = "app.kubernetes.io/name"


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def container(deployment: dict, name: str) -> dict:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
               if c["name"] == name]
    return found


def environment(docs: list[dict], deployment: dict, name: str) -> dict[str, str]:
    """The variables a container sees: its ConfigMaps', then its own literal values."""
    maps = objects(docs, "ConfigMap")
    c = container(deployment, name)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process started with these variables has (and nothing of ours)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("CLEANDIFT_")]:
            patch.delenv(name)
        for name, value in env.items():
            if name.startswith("CLEANDIFT_") and "$(" not in value:
                patch.setenv(name, value)
        return Settings()


def matches(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and `In` expressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return kustomize(OVERLAY)


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return kustomize("k8s")


def model_workers(docs: list[dict]) -> dict[str, dict]:
    """Served name -> its worker Deployment."""
    return {d["metadata"]["labels"][MODEL_LABEL]: d for d in objects(docs, "Deployment").values()
            if MODEL_LABEL in d["metadata"].get("labels", {})}


def test_the_api_serves_exactly_the_models_that_have_workers(overlay):
    api = objects(overlay, "Deployment")["api"]
    fleet = fleet_of(settings_from(environment(overlay, api, "api")))
    names = [plan.name for plan in fleet.models]
    assert names == ["sd21", "sd15"] and fleet.default == "sd21"
    assert set(model_workers(overlay)) == set(names)
    scalers = objects(overlay, "ScaledObject")
    assert set(scalers) == {f"cleandift-worker-{name}" for name in names}
    # The one-model worker (on the unnamed queue cleandift:*) is not deployed beside them.
    assert "worker" not in objects(overlay, "Deployment")


def test_each_model_worker_serves_its_name_and_keda_watches_its_queue(overlay):
    scalers = objects(overlay, "ScaledObject")
    for name, worker in model_workers(overlay).items():
        assert worker["metadata"]["name"] == f"cleandift-worker-{name}"
        env = environment(overlay, worker, "worker")
        settings = settings_from(env)
        assert settings.model_name == name
        declared = {e["name"] for e in container(worker, "worker")["env"]}
        assert {"CLEANDIFT_MODEL_NAME", "CLEANDIFT_MODEL"} <= declared  # not the ConfigMap's
        # It waits for its own model's registry folder, not the one-model default.
        [wait] = worker["spec"]["template"]["spec"]["initContainers"]
        assert wait["command"][-1] == settings.model and settings.model.startswith("/registry/")
        keys = Keys(settings.queue_prefix, settings.model_name)
        assert keys.jobs == f"cleandift.{name}:jobs" and keys.wake == f"cleandift.{name}:wake"

        scaled = scalers[f"cleandift-worker-{name}"]
        assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
        streams, wake = scaled["spec"]["triggers"]
        assert streams["type"] == "redis-streams"
        assert streams["metadata"]["stream"] == keys.jobs
        assert streams["metadata"]["consumerGroup"] == keys.group
        assert wake["type"] == "redis" and wake["metadata"]["listName"] == keys.wake
        names = {e["name"] for e in container(worker, "worker")["env"]} | set(env)
        for trigger in (streams, wake):
            assert {trigger["metadata"]["addressFromEnv"],
                    trigger["metadata"]["passwordFromEnv"]} <= names
    specs = [settings_from(environment(overlay, w, "worker")).model
             for w in model_workers(overlay).values()]
    assert len(set(specs)) == len(specs)  # two names for one model would be a mistake


def test_model_deployments_select_only_their_own_pods(overlay):
    deployments = objects(overlay, "Deployment")
    for a, b in itertools.permutations(deployments.values(), 2):
        assert not matches(a["spec"]["selector"], pod_labels(b)), \
            (a["metadata"]["name"], b["metadata"]["name"])
    for name, worker in model_workers(overlay).items():
        selector = worker["spec"]["selector"]["matchLabels"]
        assert selector == {APP_LABEL: "cleandift-worker", MODEL_LABEL: name}
        assert matches(worker["spec"]["selector"], pod_labels(worker))
    # What selects "the workers" still selects every model's: the disruption budget, the
    # network policies (their own ingress, Redis's), the PodMonitor of k8s/monitoring.
    shared = [objects(overlay, "PodDisruptionBudget")["worker"]["spec"]["selector"],
              objects(overlay, "NetworkPolicy")["worker"]["spec"]["podSelector"],
              objects(overlay, "NetworkPolicy")["redis"]["spec"]["ingress"][0]["from"][0]
              ["podSelector"],
              objects(kustomize("k8s/monitoring"), "PodMonitor")["cleandift-worker"]["spec"]
              ["selector"]]
    for selector in shared:
        assert all(matches(selector, pod_labels(w)) for w in model_workers(overlay).values())
    assert len(model_workers(overlay)) >= 2


def without_model(doc: dict) -> dict:
    """A model's worker Deployment or ScaledObject with what makes it that model's undone:
    what is left must be the one-model worker's, field for field."""
    doc["metadata"]["name"] = "worker"
    doc["metadata"]["labels"].pop(MODEL_LABEL)
    spec = doc["spec"]
    if doc["kind"] == "ScaledObject":
        spec["scaleTargetRef"]["name"] = "worker"
        spec["triggers"][0]["metadata"]["stream"] = Keys().jobs
        spec["triggers"][1]["metadata"]["listName"] = Keys().wake
        return doc
    spec["selector"]["matchLabels"].pop(MODEL_LABEL)
    spec["template"]["metadata"]["labels"].pop(MODEL_LABEL)
    c = container(doc, "worker")
    c["env"] = [e for e in c["env"] if e["name"] not in ("CLEANDIFT_MODEL_NAME", "CLEANDIFT_MODEL")]
    spec["template"]["spec"]["initContainers"][0]["command"][-1] = "/registry/student"
    return doc


def test_the_overlay_changes_nothing_but_the_models(overlay, base):
    """Same images, resources, probes, security and everything shared as the one-model
    deployment: a change to k8s/common or k8s/worker reaches both."""
    def key(doc: dict) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    names = list(model_workers(overlay))
    one = {key(doc): doc for doc in copy.deepcopy(base)}
    rest = {key(doc): doc for doc in copy.deepcopy(overlay)}
    for kind in ("Deployment", "ScaledObject"):
        reference = one.pop((kind, "worker"))
        for name in names:
            doc = rest.pop((kind, f"cleandift-worker-{name}"))
            assert without_model(doc) == reference, (kind, name)
    api = container(rest[("Deployment", "api")], "api")
    api["env"] = [e for e in api["env"] if e["name"] != "CLEANDIFT_MODELS"]
    assert rest == one


def test_the_base_stays_the_one_model_deployment(base):
    worker = objects(base, "Deployment")["worker"]
    names = {e["name"] for c in worker["spec"]["template"]["spec"]["containers"]
             for e in c.get("env", [])}
    assert "CLEANDIFT_MODEL_NAME" not in names and not model_workers(base)
    api = objects(base, "Deployment")["api"]
    assert fleet_of(settings_from(environment(base, api, "api"))).default is None


# ---- docker compose -------------------------------------------------------------------


def resolve_extends(service: dict) -> dict:
    """Compose's `extends` with a file: that file's service, then this one over it."""
    service = dict(service)
    ref = service.pop("extends", None)
    if ref is None:
        return service
    parent = untag(load_compose(ref["file"]))["services"][ref["service"]]
    parent.pop("depends_on", None)  # never inherited (Compose's documentation)
    return merge(parent, service)


def two_models_compose() -> dict[str, dict]:
    merged = untag(load_compose("docker-compose.yml"))
    for layer in ("docker-compose.override.yml", "docker-compose.two-models.yml",
                  "docker-compose.two-models.gpu.yml"):
        merged = merge(merged, load_compose(layer))
    return {name: resolve_extends(s) for name, s in merged["services"].items()}


def test_compose_two_models_gives_each_model_a_worker():
    services = two_models_compose()
    fleet = fleet_of(Settings(models=services["api"]["environment"]["CLEANDIFT_MODELS"]))
    names = [plan.name for plan in fleet.models]
    assert names == ["sd21", "sd15"] and fleet.default == "sd21"
    workers = {s["environment"]["CLEANDIFT_MODEL_NAME"]: (n, s) for n, s in services.items()
               if s.get("command") == ["worker"]}
    assert set(workers) == set(names)
    assert workers["sd21"][0] == "worker" and workers["sd15"][0] == "worker-sd15"
    queues = {Keys(Settings().queue_prefix, name).jobs for name in names}
    assert queues == {"cleandift.sd21:jobs", "cleandift.sd15:jobs"}

    worker, sd15 = services["worker"], services["worker-sd15"]
    for field in ("image", "command", "volumes", "healthcheck", "deploy", "stop_grace_period",
                  "restart"):
        assert sd15[field] == worker[field], field
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for key in ("CLEANDIFT_API_KEY", "CLEANDIFT_REQUEST_TIMEOUT_S", "CLEANDIFT_MAX_BATCH",
                "CLEANDIFT_WORKER_PORT"):  # written out (no `extends` in Compose v1)
        assert sd15["environment"][key] == worker["environment"][key], key
    assert sd15["depends_on"]["redis"]["condition"] == "service_healthy"
    assert sd15["environment"]["REDIS_URL"] == worker["environment"]["REDIS_URL"]
    # Its own weights: neither the sd21 model nor the SD 2.1 UNet of CLEANDIFT_UNET.
    assert "CLEANDIFT_MODEL_SD15" in sd15["environment"]["CLEANDIFT_MODEL"]
    assert "CLEANDIFT_UNET_SD15" in sd15["environment"]["CLEANDIFT_UNET"]
    assert worker["environment"]["CLEANDIFT_MODEL"] == "${CLEANDIFT_MODEL:-}"  # as before


def test_compose_two_models_on_cpu_and_both_workers_scraped():
    # Compose resolves `extends` within each file, then merges the files in order.
    two = load_compose("docker-compose.two-models.yml")
    two["services"] = {name: resolve_extends(s) for name, s in two["services"].items()}
    merged = untag(load_compose("docker-compose.yml"))
    for layer in (load_compose("docker-compose.cpu.yml"), two,
                  load_compose("docker-compose.two-models.cpu.yml")):
        merged = merge(merged, layer)
    services = merged["services"]
    for name in ("worker", "worker-sd15"):
        assert services[name]["environment"]["CLEANDIFT_DEVICE"] == "cpu", name
        assert not services[name].get("deploy"), name  # no GPU reservation left
    assert services["worker-sd15"]["environment"]["CLEANDIFT_MODEL_NAME"] == "sd15"
    scrape = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    names = {n for job in scrape["scrape_configs"] for sd in job.get("dns_sd_configs", [])
             for n in sd["names"]}
    assert {"worker", "worker-sd15"} <= names


def test_compose_without_the_override_is_the_one_model_stack():
    services = untag(load_compose("docker-compose.yml"))["services"]
    assert "CLEANDIFT_MODELS" not in services["api"]["environment"]
    assert "CLEANDIFT_MODEL_NAME" not in services["worker"]["environment"]
    assert not any(name.startswith("worker-") for name in services)
