"""Inputs that try to step outside their bounds: registry names that climb out of the
registry, and connections to a worker's port that never send anything."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from cleandift import registry
from cleandift.cli import _register_optional_commands, app
from cleandift.loading import ModelLoadError, resolve_spec
from tests.reliability.helpers import IMAGE
from tests.service.service_helpers import running_service

pytestmark = pytest.mark.integration


@pytest.fixture
def registries(tmp_path):
    """R with model `good` (v1 LATEST), and beside it X/evil/v9: a complete version
    folder outside R that a crafted name or version could point at."""
    files = {registry.UNET_FILE: tmp_path / "u.bin"}
    files[registry.UNET_FILE].write_bytes(b"weights")
    registry.publish(tmp_path / "R", "good", files, {"base": "demo"})
    registry.publish(tmp_path / "X", "evil", files, {"base": "demo"})
    (tmp_path / "X" / "evil" / "v1").rename(tmp_path / "X" / "evil" / "v9")
    (tmp_path / "X" / "evil" / registry.LATEST).unlink()
    return tmp_path / "R", tmp_path / "X"


def publish(*args: str):
    _register_optional_commands()
    return CliRunner().invoke(app, ["publish", *args])


def test_registry_names_stay_in_the_registry(registries, tmp_path, record):
    reg, elsewhere = registries
    (tmp_path / "u.safetensors").write_bytes(b"")
    tries = {
        "--promote ../../X/evil/v9": ["--name", "good", "--promote", "../../X/evil/v9"],
        "--name ../../X/evil --promote v9": ["--name", "../../X/evil", "--promote", "v9"],
        "--name ../x --unet FILE": ["--name", "../x", "--unet", str(tmp_path / "u.safetensors"),
                                    "--base", "demo"],
        "--promote .hidden": ["--name", "good", "--promote", ".staging-x"],
    }
    said = {}
    for name, args in tries.items():
        result = publish("--registry", str(reg), *args)
        assert result.exit_code == 2, (name, result.output)
        assert isinstance(result.exception, SystemExit), (name, result.exception)  # no trace
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid "), (name, lines)
        said[name] = lines[0]
    assert registry.latest_version(reg / "good") == "v1"
    assert not (elsewhere / "evil" / registry.LATEST).exists() and not (tmp_path / "x").exists()
    # A LATEST written by hand (or by an older publisher) is not followed out either.
    (reg / "good" / registry.LATEST).write_text("../../X/evil/v9\n")
    with pytest.raises(registry.InvalidName, match="invalid version"):
        registry.resolve(reg / "good")
    with pytest.raises(ModelLoadError, match="invalid version"):
        resolve_spec(reg / "good", tmp_path)
    assert registry.latest_version(reg / "good") is None  # a watcher keeps what it serves
    for call in (lambda: registry.list_versions(reg, ".."),
                 lambda: registry.promote(reg, "good", "../v1")):
        with pytest.raises(registry.InvalidName):
            call()
    record(fault="registry names and versions that climb out of the registry "
                 f"({len(tries)} CLI tries, a crafted LATEST)", sent=len(tries) + 1,
           succeeded=0, refused=len(tries) + 1, errors=0, lost=0,
           notes="each try: exit 2 with one line, e.g. "
                 f"'{said['--promote ../../X/evil/v9']}'; nothing written outside R; "
                 "resolve refuses LATEST '../../X/evil/v9', a watcher ignores it")


def test_idle_connections_to_a_worker_port_are_closed(settings, extractor, record):
    """Half-open connections (a scanner, a client that died) each hold a thread of the
    worker's port; with the idle timeout they are closed and their threads end."""
    quick = settings.model_copy(update={"worker_idle_timeout_s": 0.5})
    with running_service(quick, extractor) as (client, threads):
        url = httpx.URL(threads[0].worker.url)
        before = threading.active_count()
        opened = time.monotonic()
        idle = [socket.create_connection((url.host, url.port), timeout=10) for _ in range(200)]
        time.sleep(0.2)
        peak = threading.active_count()
        closed = sum(sock.recv(1) == b"" for sock in idle)  # b"": the worker hung up
        took = time.monotonic() - opened
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        after = threading.active_count()
        answer = client.post("/features", files={"image": IMAGE})
    assert closed == 200 and after <= before and answer.status_code == 200
    record(fault="200 idle connections to a worker's port (idle timeout 0.5 s)", sent=200,
           succeeded=0, refused=200, errors=0, lost=0,
           notes=f"all closed by the worker within {took:.1f} s; threads {before} -> "
                 f"{peak} -> {after}; requests still answered 200")
