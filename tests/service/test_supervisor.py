"""`serve`'s supervisor stops its children tier by tier: workers drain into Redis before
Redis stops (stopping all at once lost the answers of the jobs the workers finished)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cleandift.service.processes.supervisor import Child, Supervisor

pytestmark = pytest.mark.integration  # child processes

CHILD = """
import signal, sys, time

def stop(*_):
    time.sleep(float(sys.argv[2]))
    with open(sys.argv[1], "a") as f:
        f.write(sys.argv[3])
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("up", flush=True)
while True:
    time.sleep(0.05)
"""


def child(log: Path, name: str, delay: float, tier: int) -> Child:
    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-c", CHILD, str(log), str(delay), name],
                                   stdout=subprocess.PIPE)
        assert process.stdout is not None and process.stdout.readline() == b"up\n"
        return process

    return Child(name, start, tier=tier)


def test_higher_tiers_stop_first_and_are_waited_for(tmp_path):
    log = tmp_path / "order"
    children = [child(log, "R", 0.0, tier=0), child(log, "W", 0.5, tier=1),
                child(log, "V", 0.2, tier=1)]
    supervisor = Supervisor(children, hung_after_s=60)
    supervisor.start()
    supervisor.stop()
    assert log.read_text() == "VWR"  # both workers, in parallel, then Redis
