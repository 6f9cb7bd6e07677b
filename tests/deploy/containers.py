"""Images for the compose test, built on this machine without pulling anything.

Public registries are out of reach here, so the bases come from Debian's own packages:
`debootstrap --variant=minbase` into a folder, `docker import`ed once; on top of it a
Python image (Debian's python3 and venv) and a Redis image (Debian's redis-server). The
host's CA bundle goes into them, because this machine reaches the package index through a
proxy with its own CA. The project's Dockerfiles are then built on these bases with the
build arguments docs/deploy.md describes (PYTHON_IMAGE, WORKER_BASE, TORCH). Docker keeps
every layer, so a second run rebuilds only what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MINBASE = "cleandift-test/minbase:bookworm"
PYTHON = "cleandift-test/python:3.11-bookworm"
REDIS = "cleandift-test/redis:bookworm"
# The test's own tags (CLEANDIFT_API_IMAGE / _WORKER_IMAGE): a user's images are left alone.
API, WORKER = "cleandift-test/api:0.1.0", "cleandift-test/worker:0.1.0"
MIRROR = os.environ.get("CLEANDIFT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
BUILD_TIMEOUT_S = 1500

_BASE = """FROM {minbase}
COPY host-ca.crt /etc/ssl/certs/host-ca.crt
ENV PIP_CERT=/etc/ssl/certs/host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca.crt
RUN apt-get update && apt-get install -y --no-install-recommends {packages} \\
    && rm -rf /var/lib/apt/lists/*
"""


class Unbuildable(Exception):
    """This machine lacks something the images need (the test skips, saying what)."""


def docker(*argv: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *argv], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(argv[:3])}: {done.stderr[-3000:]}")
    return done


def engine_problem() -> str | None:
    """Why no container can run here (None: the engine answers)."""
    if shutil.which("docker") is None:
        return "no docker client (Debian's docker.io package)"
    if shutil.which("docker-compose") is None:
        return "no docker-compose (Debian's docker-compose package: Compose v1)"
    done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return f"the Docker engine does not answer ({done.stderr.strip()[:200]})"
    return None


def has_image(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                          timeout=60).returncode == 0


def minbase() -> None:
    """Debian bookworm (minbase) from Debian's mirror, imported as an image; once."""
    if has_image(MINBASE):
        return
    if shutil.which("debootstrap") is None:
        raise Unbuildable("debootstrap is needed to make a base image (apt-get install "
                           "debootstrap)")
    if os.geteuid() != 0:
        raise Unbuildable("debootstrap needs root to make the base image")
    with tempfile.TemporaryDirectory(prefix="cleandift-rootfs-") as tmp:
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", tmp, MIRROR],
                       check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
        tar = subprocess.Popen(["tar", "-C", tmp, "-c", "."], stdout=subprocess.PIPE)
        docker("import", "-", MINBASE, stdin=tar.stdout, timeout=BUILD_TIMEOUT_S)
        tar.wait()


def base_images() -> None:
    """The Python and Redis bases (cached by Docker after the first run)."""
    minbase()
    for tag, packages in ((PYTHON, "python3 python3-venv python-is-python3"),
                          (REDIS, "redis-server redis-tools")):
        with tempfile.TemporaryDirectory(prefix="cleandift-base-") as tmp:
            shutil.copy(HOST_CA, Path(tmp) / "host-ca.crt")
            (Path(tmp) / "Dockerfile").write_text(_BASE.format(minbase=MINBASE,
                                                               packages=packages))
            docker("build", "-q", "-t", tag, tmp, timeout=BUILD_TIMEOUT_S)


def torch_wheel() -> Path | None:
    """A CPU build of torch on this machine (pip's --find-links folders), if any."""
    folders = os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()
    for folder in map(Path, folders):
        wheels = sorted(folder.glob("torch-*+cpu-*.whl")) if folder.is_dir() else []
        if wheels:
            return wheels[-1]
    return None


def project_images() -> None:
    """The API and worker images from the project's Dockerfiles, on the Debian bases; the
    worker with the CPU torch wheel of this machine (no CUDA build downloaded)."""
    wheel = torch_wheel()
    if wheel is None:
        raise Unbuildable("no CPU torch wheel in PIP_FIND_LINKS: the worker image would "
                          "download a CUDA build")
    docker("build", "-q", "-f", "docker/Dockerfile.api", "-t", API,
           "--build-arg", f"PYTHON_IMAGE={PYTHON}", ".", cwd=ROOT, timeout=BUILD_TIMEOUT_S)
    staged = ROOT / "docker" / "wheels" / wheel.name  # in the worker's build context only
    already = staged.exists()
    try:
        if not already:
            shutil.copy(wheel, staged)
        docker("build", "-q", "-f", "docker/Dockerfile.worker", "-t", WORKER,
               "--build-arg", f"PYTHON_IMAGE={PYTHON}", "--build-arg", f"WORKER_BASE={PYTHON}",
               "--build-arg", f"TORCH=torch=={wheel.name.split('-')[1]}", ".", cwd=ROOT,
               timeout=BUILD_TIMEOUT_S)
    finally:
        if not already:
            staged.unlink(missing_ok=True)
