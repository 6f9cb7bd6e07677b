"""`docker compose up`, for real: both images built from the project's Dockerfiles, the
stack brought up with the CPU override, answered through the API container, scraped, a
new registry version published into the shared volume and served, then torn down
(containers, network, volumes). Runs where a Docker engine answers (`.ci/run` starts one
when it can); skips, saying why, where none does. Compose is Debian's v1 here: the files
are kept to what v1 and v2 both read (docs/deploy.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.deploy import containers

ROOT = containers.ROOT
FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]
UP_TIMEOUT_S = 300
DEMO_UNET = "/models/demo/unet/diffusion_pytorch_model.safetensors"

# Building the images the first time takes minutes (cached afterwards).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def _cannot(problem: str) -> None:
    """Skip, saying why; fail where CI started an engine and asked for this test."""
    if os.environ.get("CLEANDIFT_REQUIRE_DOCKER"):
        pytest.fail(f"CLEANDIFT_REQUIRE_DOCKER is set (.ci/run): {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def engine() -> None:
    problem = containers.engine_problem()
    if problem is not None:
        _cannot(problem)
    try:
        containers.base_images()
        containers.project_images()
    except containers.Unbuildable as exc:
        _cannot(str(exc))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """One compose project of the repository's files, under a name of its own."""

    def __init__(self, port: int) -> None:
        self.project = f"cleandift-test-{uuid.uuid4().hex[:6]}"
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "COMPOSE_PROJECT_NAME": self.project,
                    "CLEANDIFT_REDIS_IMAGE": containers.REDIS,
                    "CLEANDIFT_API_IMAGE": containers.API,
                    "CLEANDIFT_WORKER_IMAGE": containers.WORKER,
                    "CLEANDIFT_PUBLISH": f"127.0.0.1:{port}",
                    "CLEANDIFT_MODEL": "/registry/student"}
        self.env.pop("COMPOSE_FILE", None)

    def compose(self, *argv: str, timeout: float = 600, env: dict | None = None) -> str:
        done = subprocess.run(["docker-compose", *FILES, *argv], cwd=ROOT, env=env or self.env,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(argv)}: {done.stderr[-4000:]}\n"
                                 f"{self.logs()}")
        return done.stdout

    def logs(self) -> str:
        done = subprocess.run(["docker-compose", *FILES, "logs", "--no-color", "--tail", "40"],
                              cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=120)
        return done.stdout[-6000:]

    def publish(self) -> str:
        """A registry version of the demo model's UNet, published from a worker container
        into the shared volume; returns the command's last line."""
        script = (f"test -f {DEMO_UNET} || cleandift demo-model /models/demo >/dev/null; "
                  f"cleandift publish --registry /registry --name student --base /models/demo "
                  f"--unet {DEMO_UNET} --force")
        out = self.compose("run", "--rm", "--no-deps", "--entrypoint", "sh", "worker",
                           "-c", script)
        return out.strip().splitlines()[-1]

    def version(self) -> str:
        return httpx.get(f"{self.url}/v1/models", timeout=10).json()["version"]


@pytest.fixture(scope="module")
def stack(engine) -> Iterator[Stack]:
    stack = Stack(_free_port())
    try:
        first = stack.publish()  # the worker serves /registry/student: seed it first
        assert first.startswith("published student"), first
        stack.compose("up", "-d", "--no-build")
        _wait_ready(stack)
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "30")
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        leftovers = subprocess.run(["docker", *kind, "-q", "--filter", label],
                                   capture_output=True, text=True).stdout.strip()
        assert not leftovers, f"`docker {kind[0]}` shows what outlived `down`: {leftovers}"


def _wait_ready(stack: Stack) -> None:
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"the stack was not ready in {UP_TIMEOUT_S} s:\n{stack.logs()}")


def test_the_stack_answers_features_and_correspondences(stack: Stack):
    cat = (ROOT / "examples" / "cat.jpg").read_bytes()
    coffee = (ROOT / "examples" / "coffee.jpg").read_bytes()
    features = httpx.post(f"{stack.url}/features", files={"image": ("cat.jpg", cat)},
                          data={"layers": "us6"}, timeout=120)
    assert features.status_code == 200, features.text
    us6 = features.json()["features"]["us6"]
    assert len(us6["shape"]) == 3 and features.headers["x-model-version"] == stack.version()
    matches = httpx.post(f"{stack.url}/correspond", timeout=120,
                         files=[("source", ("cat.jpg", cat)), ("target", ("coffee.jpg", coffee))],
                         data={"points": json.dumps([[120, 80], [200.5, 140]])})
    assert matches.status_code == 200, matches.text
    assert len(matches.json()["matches"]) == 2
    bad = httpx.post(f"{stack.url}/features", files={"image": ("x.jpg", b"not an image")},
                     timeout=30)
    assert bad.status_code in (400, 415, 422)
    assert bad.headers["content-type"].startswith("application/problem+json")


def test_metrics_are_scraped_from_the_api(stack: Stack):
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    assert "cleandift_requests_total" in text and 'route="/features"' in text


def test_a_version_published_into_the_volume_is_served(stack: Stack):
    before = stack.version()
    line = stack.publish()
    assert line.startswith("published student") and before not in line
    deadline = time.monotonic() + 120
    while stack.version() == before:
        assert time.monotonic() < deadline, f"still {before}:\n{stack.logs()}"
        time.sleep(1)
    answer = httpx.post(f"{stack.url}/features", timeout=120, data={"layers": "us6"},
                        files={"image": ("cat.jpg", (ROOT / "examples/cat.jpg").read_bytes())})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == stack.version()


def test_the_published_port_is_on_loopback_only_by_default(stack: Stack):
    ports = stack.compose("port", "api", "8000").strip()
    assert ports.startswith("127.0.0.1:"), ports
    # And when nobody sets CLEANDIFT_PUBLISH, as on a user's machine:
    default = {k: v for k, v in stack.env.items() if k != "CLEANDIFT_PUBLISH"}
    [port] = yaml.safe_load(stack.compose("config", env=default))["services"]["api"]["ports"]
    if isinstance(port, dict):  # Compose v2 writes the long syntax
        port = f"{port['host_ip']}:{port['published']}:{port['target']}"
    assert port.startswith("127.0.0.1:8000:8000"), port
