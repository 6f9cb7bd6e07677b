"""Settings are checked when built: types, ranges, aliases and the rules tying fields."""

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from cleandift.cli import app
from cleandift.settings import Settings


def test_aliases_and_environment(monkeypatch):
    monkeypatch.setenv("CLEANDIFT_DTYPE", "fp16")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("CLEANDIFT_DEVICE", "")  # empty counts as unset
    settings = Settings()
    assert (settings.dtype, settings.redis_url, settings.device) == (
        "float16", "redis://example:6379/0", None)


@pytest.mark.parametrize("bad", [
    {"dtype": "int8"},
    {"device": "gpu"},
    {"min_size": 512, "max_size": 256},
    {"heartbeat_s": 10, "worker_ttl_s": 5},
    {"result_ttl_s": 10, "request_timeout_s": 60},
    {"max_batch": 0},
    {"queue_prefix": "has space"},
    {"cancel_poll_s": 0},
    {"cancel_poll_s": -1},
])
def test_inconsistent_values_are_refused_with_the_field_named(bad):
    with pytest.raises(ValidationError) as err:
        Settings(**bad)
    assert any(name in str(err.value) for name in bad)


def test_the_cli_reports_a_bad_setting_and_exits_2(monkeypatch):
    monkeypatch.setenv("CLEANDIFT_DTYPE", "float8")
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 2 and "dtype" in result.output


def test_version_flag():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("cleandift ")


def test_keywords_set_fields_that_have_env_aliases():
    """Settings(worker_port=0) once silently kept 9001 (the field has env aliases), so all
    test workers shared one port: whoever bound it first served the others' results."""
    from cleandift.settings import Settings

    assert Settings(worker_port=0).worker_port == 0
    assert Settings(redis_url="redis://127.0.0.1:1").redis_url == "redis://127.0.0.1:1"


def test_the_job_cost_ceiling_follows_the_workers_device_unless_set():
    from cleandift.settings import CPU_JOB_COST, GPU_JOB_COST, Settings

    assert Settings().job_cost_for("cpu").max_job_cost == CPU_JOB_COST
    assert Settings().job_cost_for("cuda").max_job_cost == GPU_JOB_COST
    assert Settings(max_job_cost=12).job_cost_for("cuda").max_job_cost == 12
