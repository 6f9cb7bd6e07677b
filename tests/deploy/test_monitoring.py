"""The monitoring that ships with the service: alert rules and their unit tests (promtool),
the Grafana dashboard and its provisioning, the compose `monitoring` profile, and that
every metric they use is one the service exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from cleandift.service.metrics import ApiMetrics, QueueState, WorkerMetrics
from tests.deploy.test_deploy import load_compose

# Runs external programs (kubectl, promtool, pip, child processes): integration.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "cleandift.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=MONITORING)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_are_valid_and_their_unit_tests_pass(promtool):
    tool = promtool
    run(tool, "check", "rules", "alerts.yml")
    run(tool, "test", "rules", "alerts.test.yml")


def test_every_alert_has_a_unit_test_that_fires_it():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((MONITORING / "alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    assert len(alerts) == 8 and fired == alerts, sorted(alerts - fired)


def test_prometheus_config_is_valid(promtool):
    tool = promtool
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["rule_files"] = ["alerts.yml"]  # the path inside the container, made local
    local = MONITORING / ".prometheus-check.yml"
    local.write_text(yaml.safe_dump(config))
    try:
        run(tool, "check", "config", local.name)
    finally:
        local.unlink()


def test_the_operator_rules_equal_the_alert_rules():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    operator = yaml.safe_load((ROOT / "k8s/monitoring/prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == rules["groups"]


def exported_names() -> set[str]:
    worker = WorkerMetrics()
    worker.watch_gpu(lambda: {"allocated": 1, "reserved": 1, "total": 1, "utilization": 1},
                     "cuda:0")
    api = ApiMetrics().render(QueueState(depth=0, pending=0, model=("m", "v")))
    names = set()
    for text in (api.decode(), worker.render().decode()):
        names |= set(re.findall(r"^# TYPE (\w+)", text, re.M))
    return used_names(" ".join(names))


def used_names(text: str) -> set[str]:
    found = set(re.findall(r"\bcleandift_[a-z_]+\b", text))
    out = set()
    for name in found:
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        out.add(name)
    return out


def test_alerts_and_dashboard_use_only_exported_metrics():
    exported = exported_names()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    rules = (MONITORING / "alerts.yml").read_text()
    assert used_names(exprs) and used_names(rules)
    assert used_names(exprs) <= exported, used_names(exprs) - exported
    assert used_names(rules) <= exported, used_names(rules) - exported
    # The cleandift_ strings of the rules that are not metrics: the dead-letter stream.
    assert "queue_wait_seconds" in " ".join(exported)


def test_dashboard_is_provisioned_against_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = sources["datasources"][0]["uid"]
    assert dashboard["uid"] and len({p["id"] for p in dashboard["panels"]}) == len(
        dashboard["panels"])
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"]
    providers = yaml.safe_load(
        (MONITORING / "grafana/provisioning/dashboards/cleandift.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_monitoring_profile_mounts_files_that_exist():
    services = load_compose("docker-compose.yml")["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
    assert {job["job_name"] for job in scrape} == {"cleandift-api", "cleandift-worker"}
    worker_port = services["worker"]["environment"]["CLEANDIFT_WORKER_PORT"]
    assert scrape[1]["dns_sd_configs"][0]["port"] == int(worker_port)
