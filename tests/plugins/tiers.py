"""Test tiers, marked by what a test uses rather than by hand.

A test is `integration` when it asks for a fixture that starts something outside the test
process (a redis-server, a uvicorn server, workers, a browser, an external program), or
when it is marked so because it starts subprocesses itself. Every other test is `unit`.
Unit tests are watched while they run: one that starts a process or opens a connection to
Redis fails and says how to mark it, so the unit tier (`-m unit`) cannot quietly grow
into the slow one again.
"""

from __future__ import annotations

import multiprocessing.process
import subprocess

import pytest
import redis.asyncio.connection
import redis.connection

# Fixture name -> what it starts (why a test using it is integration).
INTEGRATION_FIXTURES = {
    "redis_url": "a redis-server",
    "redis_cluster": "three redis-server cluster nodes",
    "settings": "a redis-server (the service settings point at it)",
    "service": "a uvicorn server and workers",
    "browser": "Chromium",
    "promtool": "promtool",
    "hadolint": "hadolint",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: runs in the test process alone (automatic)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None \
                and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


class Refused(OSError):
    """What the guard raises: an OSError, as a failed start or connection would be, so
    the code under test takes its usual error path (the test fails afterwards anyway)."""


@pytest.fixture(autouse=True)
def unit_tests_stay_in_process(request: pytest.FixtureRequest,
                               monkeypatch: pytest.MonkeyPatch):
    """Record (and refuse) a process start or a Redis connection made by a unit test."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    seen: list[str] = []

    def refuse(what: str):
        def guard(*args, **kwargs):
            seen.append(what)
            raise Refused(f"a unit test may not {what}")
        return guard

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        refuse("start a process"))
    monkeypatch.setattr(redis.connection.AbstractConnection, "connect",
                        refuse("connect to Redis"))
    monkeypatch.setattr(redis.asyncio.connection.AbstractConnection, "connect",
                        refuse("connect to Redis"))
    yield
    if seen:
        pytest.fail(f"{request.node.nodeid} tried to {seen[0]}: use the fixture that starts "
                    "it (tests/plugins/tiers.py lists them) or mark the test "
                    "`integration`", pytrace=False)
