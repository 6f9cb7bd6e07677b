"""The API process: uvicorn in this process, or several sharing the port."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from cleandift.settings import Settings

from ..metrics import MULTIPROC_ENV
from ..observability import configure_process


def run_api(settings: Settings) -> None:
    """uvicorn in this process, or `api_workers` processes sharing the port (their
    metrics in one multiprocess directory, so any of them answers for all)."""
    import uvicorn

    from ..api.app import create_app

    configure_process(settings, "cleandift-api")
    common: dict[str, Any] = {"host": settings.host, "port": settings.port,
                              "log_level": settings.log_level.lower(), "log_config": None,
                              "access_log": False,
                              "timeout_graceful_shutdown": int(settings.request_timeout_s)}
    if settings.api_workers > 1:  # CPU-bound encoding scales with processes, not threads
        os.environ.update(settings_env(settings))
        directory = metrics_directory(settings.metrics_dir)
        os.environ[MULTIPROC_ENV] = str(directory)
        try:
            uvicorn.run("cleandift.service.api.app:app_from_env", factory=True,
                        workers=settings.api_workers, **common)
        finally:  # a directory of our own making goes with us; a configured one stays
            if settings.metrics_dir is None:
                shutil.rmtree(directory, ignore_errors=True)
    else:
        uvicorn.run(create_app(settings), **common)


def metrics_directory(configured: Path | None) -> Path:
    """An empty directory for this run's multiprocess metrics files: values of an
    earlier run must not be summed into this one."""
    directory = configured or Path(tempfile.mkdtemp(prefix="cleandift-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as CLEANDIFT_* variables, to hand to a child process."""
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}  # the API's own
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if value is not None:
            env[f"CLEANDIFT_{name.upper()}"] = str(value)
    return env
