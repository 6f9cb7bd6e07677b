"""Suite-wide fixtures: a private model cache, the demo model, test images.

Nothing here downloads anything: the demo model is created from its config and seed.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import tqdm
from PIL import Image

from tests.corpus import textured_image

# Shared fixtures and the tier marks, for every folder of the suite.
pytest_plugins = ["tests.plugins.service", "tests.plugins.programs", "tests.plugins.tiers",
                  "tests.plugins.report"]

_CACHE = Path(tempfile.mkdtemp(prefix="cleandift-test-cache-"))
os.environ.setdefault("CLEANDIFT_CACHE_DIR", str(_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tqdm's monitor thread lives from the first progress bar to the end of the process: off,
# so that the leak check below sees only threads a test really left behind.
tqdm.tqdm.monitor_interval = 0


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["CLEANDIFT_CACHE_DIR"])


@pytest.fixture(scope="session")
def demo_dir(cache_dir: Path) -> Path:
    from cleandift.demo import ensure_model

    return ensure_model("demo", cache_dir, seed=0)


@pytest.fixture(scope="session")
def extractor(demo_dir: Path):
    from cleandift import load_extractor

    return load_extractor(demo_dir, device="cpu")


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    return textured_image(320, 240, seed=1)


@pytest.fixture(scope="session")
def photo2() -> Image.Image:
    return textured_image(300, 280, seed=2)


# How long a thread or child may take to finish after its test: above the worker port's
# idle timeout (30 s), whose connection threads end on their own once their client is gone.
LEAK_GRACE_S = 35.0


# AnyIO's thread pool (FastAPI's sync work) keeps idle workers for 10 s, then they end on
# their own: pool threads, not state of a test.
POOL_THREADS = ("AnyIO worker thread",)


def _alive_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate()
            if t.is_alive() and not t.name.startswith(POOL_THREADS)}


def _children() -> set[psutil.Process]:
    return set(psutil.Process().children(recursive=True))


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail a test that leaves a thread or a child process running after its fixtures are
    torn down: a leftover watcher or worker writes into state that later tests read.
    Session and module fixtures are set up before this one, so what they start is not
    counted (they own it until the end of their scope)."""
    threads, children = _alive_threads(), _children()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        new_threads = _alive_threads() - threads
        new_children = {c for c in _children() - children if _running(c)}
        if not (new_threads or new_children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if new_threads or new_children:
        names = sorted(t.name for t in new_threads) + sorted(
            f"pid {c.pid} ({_cmdline(c)})" for c in new_children)
        pytest.fail(f"{request.node.nodeid} left running: {', '.join(names)}", pytrace=False)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:80]
    except psutil.Error:
        return "?"
