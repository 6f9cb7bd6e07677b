"""`extract-dataset --engine ray` (Ray started on this machine, two actors): killed after a
committed shard (the driver and every Ray process of its session) and run again, every
file is byte-identical to an uninterrupted run of the local engine. The images are read
through a `file://` URL (fsspec, in Ray's tasks), as from object storage, and the last
one from a local HTTP server that holds its answer while the run is to be killed: so the
kill lands after the first commit and before the end however loaded the machine is."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cleandift.datasets import FeatureDataset, read_index
from tests.cleandift.test_bulk import lines, write_folder
from tests.corpus import encode, textured_image

pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.integration

ITEMS = 41  # 39 files, one held URL, and a corrupt file (an error row, as in the local engine)


def run(source: Path | str, out: Path, demo_dir: Path, cache_dir: Path, *more: str
        ) -> subprocess.Popen:
    env = {**os.environ, "CLEANDIFT_CACHE_DIR": str(cache_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "cleandift.cli", "extract-dataset", str(source), "--out", str(out),
         "--layers", "us6,mid", "--size", "128", "--shard-size", "8", "--batch-size", "4",
         "--model", str(demo_dir), *more], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)


def kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL the driver and everything of its session: Ray's own processes (GCS, raylet)
    and its actors, as a pod or a terminal that goes away would."""
    subprocess.run(["pkill", "-KILL", "-s", str(leader.pid)], check=False)
    leader.wait()
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-s", str(leader.pid)], capture_output=True).stdout.strip():
        assert time.monotonic() < deadline, "Ray processes outlived the kill"
        time.sleep(0.1)


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@contextmanager
def held_image(image: bytes) -> Iterator[tuple[str, threading.Event]]:
    """(URL, release): the URL answers `image` once `release` is set, waiting until then."""
    release, stop = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            while not (release.wait(0.1) or stop.is_set()):
                pass
            with suppress(OSError):  # a killed reader: nobody to answer
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = False  # server_close() joins them
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/held.jpg", release
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_ray_killed_and_resumed_equals_the_local_engine(tmp_path, demo_dir, cache_dir):
    folder = write_folder(tmp_path / "images", ITEMS - 2)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    image = encode(textured_image(90, 64, seed=99), "JPEG", quality=90)
    with held_image(image) as (url, release):
        (folder / "list.txt").write_text("".join(f"{f}\n" for f in files) + f"{url}\n")
        root = f"file://{folder}/list.txt"
        release.set()
        local = finish(run(root, tmp_path / "local", demo_dir, cache_dir))
        assert local == {"items": ITEMS, "resumed_after": 0, "failed": 1}

        release.clear()  # the last shard cannot be read, so not committed, until released
        ray_out = tmp_path / "ray"
        killed = run(root, ray_out, demo_dir, cache_dir, "--engine", "ray", "--workers", "2",
                     "--fetch-timeout", "600")
        deadline = time.monotonic() + 300
        while lines(ray_out) < 8:  # one shard committed, the run going on
            assert killed.poll() is None and time.monotonic() < deadline, "finished too soon"
            time.sleep(0.01)
        kill_session(killed)
        assert 8 <= lines(ray_out) <= ITEMS - 1
        release.set()
        resumed = finish(run(root, ray_out, demo_dir, cache_dir, "--engine", "ray",
                             "--workers", "2"))
    assert resumed["items"] == ITEMS and resumed["resumed_after"] >= 8
    assert resumed["failed"] == 1

    a, b = tmp_path / "local", ray_out
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 2 + 6
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    rows = read_index(b)
    assert [r["key"] for r in rows] == [r["key"] for r in read_index(a)]
    assert FeatureDataset(b)[rows[0]["key"]].features["us6"].shape[0] > 0


def test_ray_and_service_are_one_choice(tmp_path, demo_dir, cache_dir):
    bad = run(tmp_path, tmp_path / "out", demo_dir, cache_dir, "--engine", "ray",
              "--service", "http://127.0.0.1:9")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and b"choose one" in err


def test_every_ray_option_is_checked(tmp_path, demo_dir, cache_dir):
    bad = run(tmp_path, tmp_path / "out", demo_dir, cache_dir, "--engine", "ray",
              "--workers", "0")
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and b"--workers" in err


def test_the_read_tasks_do_not_import_torch():
    """Ray imports a task's module in each worker process that runs it: the read tasks'
    module (and what it is handed) must not pull torch in, two seconds of CPU and a few
    hundred MB per process, taken from the actors."""
    code = ("import pickle, sys\n"
            "from functools import partial\n"
            "from cleandift.datasets.ray_engine import read_shard\n"
            "from cleandift.datasets.sources import ReadLimits\n"
            "pickle.loads(pickle.dumps(partial(read_shard, batch_size=8, limits=ReadLimits())))\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_unet_file_that_does_not_fit_is_said_in_one_line(tmp_path, demo_dir, cache_dir):
    import torch
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    bad = run(write_folder(tmp_path / "images", 2), tmp_path / "out", demo_dir, cache_dir,
              "--engine", "ray", "--unet", str(tmp_path / "bad.safetensors"))
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and b"does not fit the base UNet" in err
    assert b"Traceback" not in err


def test_a_model_only_the_actors_find_wrong_is_said_in_one_line(tmp_path, demo_dir,
                                                                cache_dir):
    """A registry version is described from its files; that its UNet does not fit its
    base (here an SD2.1-shaped UNet on the SD1.5-shaped demo) only an actor's load finds:
    the command still ends with that one line and exit code 2."""
    from safetensors.torch import save_file

    from cleandift import load_extractor, registry

    unet = tmp_path / "unet.safetensors"
    save_file(load_extractor(demo_dir, device="cpu").unet.state_dict(), str(unet))
    registry.publish(tmp_path / "reg", "misfit", {registry.UNET_FILE: unet}, {"base": "demo15"})
    bad = run(write_folder(tmp_path / "images", 2), tmp_path / "out", tmp_path / "reg" / "misfit",
              cache_dir, "--engine", "ray")
    _, err = bad.communicate(timeout=300)
    last = err.decode().strip().splitlines()[-1]
    assert bad.returncode == 2, err.decode()[-3000:]
    assert last.startswith("error: ") and "does not fit the base UNet" in last, last
    # nothing was committed: the folder records no dataset, so a fixed model may use it
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_actor_that_loads_another_model_stops_the_run(demo_dir, cache_dir):
    """The driver records the model it described from its files; an actor that loads
    another (a registry's LATEST moved meanwhile) must not compute under that name."""
    from cleandift.datasets.bulk import Options
    from cleandift.datasets.ray_engine import FeatureActor, RayPlan
    from cleandift.loading import ModelLoadError

    args = {"spec": str(demo_dir), "unet": None, "device": "cpu", "dtype": None,
            "cache_dir": cache_dir, "demo_seed": 0}
    options = Options(source="-", layers=["us6"], size=128)
    FeatureActor(RayPlan(args, {"model": "cleandift-demo", "model_version": "demo-seed0"}),
                 options)
    with pytest.raises(ModelLoadError, match="the model changed"):
        FeatureActor(RayPlan(args, {"model": "cleandift-demo", "model_version": "v2"}), options)
