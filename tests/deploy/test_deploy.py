"""Deployment files checked without a Docker engine or a cluster: schemas, lint, and that
every command and setting they use exists."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from cleandift.cli import _register_optional_commands, app
from cleandift.service.queue.keys import Keys
from cleandift.settings import Settings

# Runs external programs (kubectl, promtool, pip, child processes): integration.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.override.yml",
                 "docker-compose.two-models.yml", "docker-compose.two-models.cpu.yml",
                 "docker-compose.two-models.gpu.yml"]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
K8S_VERSION = "1.30.0"


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (`!reset`, `!override`) kept as tagged values."""


class Tagged(dict):
    def __init__(self, tag: str, value) -> None:
        super().__init__(value=value)
        self.tag = tag


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(
        _tag, lambda loader, node, tag=_tag: Tagged(tag, loader.construct_mapping(node)
                                                    if isinstance(node, yaml.MappingNode)
                                                    else loader.construct_scalar(node)))


def load_compose(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def untag(value):
    if isinstance(value, Tagged):
        return untag(value["value"])
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


def merge(base, override):
    """Compose's merge of an override file, enough for these files (maps, !reset)."""
    if isinstance(override, Tagged) and override.tag == "!reset":
        return untag(override)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base.get(key), value) if key in base else untag(value)
        return out
    return untag(override)


def k8s_documents():
    """(file name, object) of every manifest file under k8s/. The overlays hold patches,
    not manifests: they are checked rendered (`kustomize`, below)."""
    for path in sorted((ROOT / "k8s").glob("**/*.yaml")):
        if ROOT / "k8s" / "overlays" in path.parents:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


# What `kubectl apply -k` applies: the one-model deployment, the several-models overlay and
# the sharded-queue one (k8s/monitoring is applied on its own).
KUSTOMIZATIONS = ["k8s", "k8s/overlays/two-models", "k8s/overlays/sharded"]
NO_SCHEMA = ("Kustomization", "ScaledObject", "PodMonitor", "PrometheusRule", "RayJob")


@functools.cache
def _render(folder: str) -> tuple[dict, ...]:
    for argv in (["kubectl", "kustomize"], ["kustomize", "build"]):
        if shutil.which(argv[0]):
            break
    else:
        if os.environ.get("CI"):
            pytest.fail("CI renders k8s/ with kubectl (or kustomize): install one")
        pytest.skip("neither kubectl nor kustomize is installed: k8s/ not rendered")
    done = subprocess.run([*argv, str(ROOT / folder)], capture_output=True, text=True)
    assert done.returncode == 0, f"{folder}: {done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def kustomize(folder: str) -> list[dict]:
    """The objects `kubectl apply -k FOLDER` sends (`kubectl kustomize FOLDER`)."""
    return copy.deepcopy(list(_render(folder)))


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_follow_the_compose_specification(name, compose_schema):
    jsonschema.validate(untag(load_compose(name)), compose_schema)


def test_gpu_by_default_cpu_with_the_override():
    """`docker compose up` with no -f adds docker-compose.override.yml (the GPU), by
    Compose's own rule; the CPU command names its files, so the GPU file is left out. No
    tracked `.env`: that file is the user's (their settings), never the repository's."""
    done = subprocess.run(["git", "ls-files", ".env"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.stdout.strip() == "" and ".env" in (ROOT / ".gitignore").read_text()
    base = load_compose("docker-compose.yml")
    gpu = merge(base, load_compose("docker-compose.override.yml"))
    for service in ("worker", "trainer"):
        reservation = gpu["services"][service]["deploy"]["resources"]["reservations"]
        assert reservation["devices"][0]["capabilities"] == ["gpu"]
        assert "deploy" not in base["services"][service]
    merged = merge(base, load_compose("docker-compose.cpu.yml"))
    worker = merged["services"]["worker"]
    assert "deploy" not in worker and worker["environment"]["CLEANDIFT_DEVICE"] == "cpu"
    assert worker["environment"]["REDIS_URL"] == "redis://redis:6379/0"  # base kept
    assert base["services"]["trainer"]["profiles"] == ["train"]
    for service in ("api", "worker"):
        assert base["services"][service]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "healthcheck" in base["services"][service]


def test_kubernetes_manifests_validate_strictly():
    checked = 0
    for _name, doc in k8s_documents():
        if doc["kind"] in NO_SCHEMA:
            continue  # no schema bundled for these: checked below and in test_k8s_policy
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 12


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_rendered_kustomizations_validate_strictly(folder):
    """What kustomize makes of the files (names, labels, patches) is checked like them."""
    docs = kustomize(folder)
    for doc in docs:
        if doc["kind"] not in NO_SCHEMA:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["namespace" if doc["kind"] != "Namespace" else "name"] \
            == "cleandift"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cleandift"
    kind_names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(kind_names) == len(set(kind_names)), sorted(kind_names)
    assert len(docs) >= 16


def test_the_base_renders_its_files():
    """k8s/ is the one-model deployment: exactly the objects of common/ and worker/."""
    files = {(doc["kind"], doc["metadata"]["name"])
             for folder in ("common", "worker")
             for path in sorted((ROOT / "k8s" / folder).glob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc
             if doc["kind"] != "Kustomization"}
    assert len(files) >= 16
    assert {(doc["kind"], doc["metadata"]["name"]) for doc in kustomize("k8s")} == files


# Applied once, on their own (docs/deploy.md): a re-apply of the kustomization must not
# reset the secret (switching auth off) nor publish the seed version again.
APPLIED_ONCE = {"secret.example.yaml", "seed-job.yaml"}


def test_kustomization_lists_every_manifest_but_the_secret_and_the_seed():
    k8s = ROOT / "k8s"
    for folder in (k8s / "common", k8s / "worker", k8s / "monitoring"):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert set(kustomization["resources"]) == files, folder.name
    # k8s/ itself: what every deployment shares and the one-model worker; beside them only
    # the files applied once.
    root = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    assert root["resources"] == ["common", "worker"]
    assert {p.name for p in k8s.glob("*.yaml")} == {"kustomization.yaml"} | APPLIED_ONCE
    kinds = {doc["kind"] for name, doc in k8s_documents() if name not in APPLIED_ONCE}
    assert "Secret" not in kinds


def test_keda_scaledobject_targets_the_real_stream():
    """KEDA's CRD schema is not bundled with kubernetes-validate (it checks built-in kinds
    only), so the ScaledObject's fields that matter are checked against the code."""
    docs = dict(k8s_documents())
    scaled, worker = docs["worker-scaledobject.yaml"], docs["worker.yaml"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0  # scale to zero: the wake list starts one
    streams, wake = scaled["spec"]["triggers"]
    keys = Keys(Settings().queue_prefix)
    assert streams["type"] == "redis-streams"
    assert streams["metadata"]["stream"] == keys.jobs
    assert streams["metadata"]["consumerGroup"] == keys.group
    assert int(streams["metadata"]["lagCount"]) > 0
    assert wake["type"] == "redis" and wake["metadata"]["listName"] == keys.wake
    assert wake["metadata"]["activationListLength"] == "0"
    # Address and password from the worker's own environment, never a copy.
    [container] = worker["spec"]["template"]["spec"]["containers"]
    env = {e["name"] for e in container["env"]} | set(docs["configmap.yaml"]["data"])
    for trigger in (streams, wake):
        assert "address" not in trigger["metadata"]
        assert {trigger["metadata"]["addressFromEnv"], trigger["metadata"]["passwordFromEnv"]} \
            <= env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile, hadolint):
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    assert "HEALTHCHECK" in text and re.search(r"^USER \d+", text, re.M)
    assert text.count("FROM ") >= 2  # multi-stage: build tools stay in the first stage


def container_commands():
    """(where, argv) of every command the deployment runs."""
    compose = load_compose("docker-compose.yml")
    for name, service in compose["services"].items():
        if "command" in service and service.get("image", "").startswith("cleandift"):
            yield f"compose:{name}", service["command"]
    for name, doc in k8s_documents():
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {}) if doc["kind"] != "ScaledObject" else {}
        for container in pod.get("containers", []):
            if container["image"].startswith("cleandift/"):
                yield f"{name}:{container['name']}", container["args"]


@pytest.mark.parametrize("where,argv", list(container_commands()))
def test_every_command_exists_in_the_cli(where, argv):
    _register_optional_commands()
    result = CliRunner().invoke(app, [argv[0], "--help"], terminal_width=200)
    assert result.exit_code == 0, f"{where}: {result.output}"
    for flag in (a for a in argv[1:] if a.startswith("--")):
        assert flag in result.output, f"{where}: {argv[0]} has no {flag}"


def test_the_rayjob_runs_the_ray_engine_on_its_gpus():
    """KubeRay's CRD is not bundled with kubernetes-validate: its fields that matter are
    checked against the CLI and the rest of k8s/ (docs/datasets.md)."""
    [job] = [doc for _, doc in k8s_documents() if doc["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["cleandift", "extract-dataset"]
    _register_optional_commands()
    result = CliRunner().invoke(app, ["extract-dataset", "--help"], terminal_width=200)
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert all(flag in result.output for flag in flags), result.output
    option = dict(zip(argv, argv[1:]))
    assert option["--engine"] == "ray" and option["--address"] == "auto"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the driver only
    [group] = cluster["workerGroupSpecs"]
    assert int(option["--workers"]) == group["replicas"] == group["maxReplicas"]
    [container] = group["template"]["spec"]["containers"]
    assert float(option["--gpus-per-worker"]) == float(
        container["resources"]["limits"]["nvidia.com/gpu"])
    claims = {doc["metadata"]["name"] for _, doc in k8s_documents()
              if doc["kind"] == "PersistentVolumeClaim"}
    pods = [cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]]
    assert {v["persistentVolumeClaim"]["claimName"] for pod in pods for v in pod["volumes"]
            if "persistentVolumeClaim" in v} <= claims
    assert cluster["rayVersion"] == "2.60.0"


def deployment_env_names():
    compose = untag(load_compose("docker-compose.yml"))
    for service in compose["services"].values():
        yield from service.get("environment", {})
    for override in ("docker-compose.cpu.yml", "docker-compose.two-models.yml"):
        for service in untag(load_compose(override))["services"].values():
            yield from service.get("environment", {})
    for _, doc in k8s_documents():
        yield from doc.get("data", {}) if doc["kind"] == "ConfigMap" else ()
        yield from doc.get("stringData", {}) if doc["kind"] == "Secret" else ()
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            yield from (e["name"] for e in container.get("env", []))
    for dockerfile in DOCKERFILES:
        for line in re.findall(r"^ENV (.+(?:\\\n.+)*)", dockerfile.read_text(), re.M):
            yield from re.findall(r"(\w+)=", line)


def test_every_env_var_is_a_real_setting():
    fields = {f"CLEANDIFT_{name.upper()}" for name in Settings.model_fields}
    names = set(deployment_env_names())
    ours = {n for n in names if n.startswith("CLEANDIFT_")}
    assert ours and ours <= fields, sorted(ours - fields)
    assert "REDIS_URL" in names  # the alias of redis_url
    for name in ours:  # and each value in the files parses as that setting
        assert Settings.model_fields[name[len("CLEANDIFT_"):].lower()]
