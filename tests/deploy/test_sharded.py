"""The sharded deployment (docs/scale.md, "Past one Redis"): k8s/overlays/sharded puts the
one-model queue on a Redis Cluster in partitions. Checked against the code: the settings
the API and the worker get agree, and KEDA watches exactly the streams the code writes
(one trigger per partition, summed by the formula) and the wake list."""

from __future__ import annotations

import re

import pytest

from cleandift.service.queue.connect import queue_keys
from tests.deploy.test_deploy import kustomize
from tests.deploy.test_several_models import container, environment, objects, settings_from

# Runs kubectl: integration.
pytestmark = pytest.mark.integration

OVERLAY = "k8s/overlays/sharded"


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return kustomize(OVERLAY)


def test_the_api_and_the_worker_agree_on_the_cluster_and_its_partitions(overlay):
    deployments = objects(overlay, "Deployment")
    api = settings_from(environment(overlay, deployments["api"], "api"))
    worker = settings_from(environment(overlay, deployments["worker"], "worker"))
    for settings in (api, worker):
        assert settings.redis_cluster and settings.queue_partitions == 12
    # The single Redis of k8s/common is not deployed beside the cluster.
    assert "redis" not in objects(overlay, "StatefulSet")
    assert "redis" not in objects(overlay, "Service")


def test_keda_sums_every_partition_and_the_wake_list(overlay):
    worker = objects(overlay, "Deployment")["worker"]
    settings = settings_from(environment(overlay, worker, "worker"))
    keys = queue_keys(settings, settings.model_name)
    scaled = objects(overlay, "ScaledObject")["worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker"
    *streams, wake = scaled["spec"]["triggers"]
    assert [t["type"] for t in streams] == ["redis-cluster-streams"] * settings.queue_partitions
    assert [t["metadata"]["stream"] for t in streams] == [
        keys.for_partition(p).jobs for p in range(settings.queue_partitions)]
    assert all(t["metadata"]["consumerGroup"] == keys.group for t in streams)
    assert all(int(t["metadata"]["lagCount"]) > 0 for t in streams)  # lag: scales to zero
    assert wake["type"] == "redis-cluster" and wake["metadata"]["listName"] == keys.wake
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    terms = re.split(r"\s*\+\s*", modifiers["formula"].strip())
    assert sorted(terms) == sorted(t["name"] for t in [*streams, wake])  # each once
    assert int(modifiers["target"]) > 0
    names = {e["name"] for e in container(worker, "worker")["env"]} | \
        set(environment(overlay, worker, "worker"))
    for trigger in [*streams, wake]:  # address and password from the worker's environment
        assert "addresses" not in trigger["metadata"]
        assert {trigger["metadata"]["addressesFromEnv"],
                trigger["metadata"]["passwordFromEnv"]} <= names
