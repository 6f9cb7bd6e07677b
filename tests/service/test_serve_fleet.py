"""`cleandift serve` with a fleet: two demo models (each its own worker process and queue)
from one command, and a version switch of two worker processes under load."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from tests.corpus import encode, textured_image
from tests.service.service_helpers import serving
from tests.service.test_reload import publish, unet_files  # noqa: F401 (a fixture)
from tests.service.test_switch import Clients

pytestmark = pytest.mark.integration


def test_one_serve_runs_two_different_demo_models(cache_dir, tmp_path, jpeg):
    with serving(["--model", "sd21=demo", "--model", "sd15=demo15", "--log-format", "json"],
                 cache_dir, tmp_path / "serve.log") as url:
        listing = httpx.get(url + "/v1/models").json()
        ready = httpx.get(url + "/readyz").json()
        answers = {name: httpx.post(f"{url}/features?model={name}", timeout=60,
                                    files={"image": ("a.jpg", jpeg)},
                                    data={"layers": "mid,us6"}).json()
                   for name in ("sd21", "sd15")}
    models = {m["name"]: m for m in listing["models"]}
    assert listing["served"] == ["sd21", "sd15"] and ready["workers"] == 2
    own = [line for line in (tmp_path / "serve.log").read_text().splitlines()
           if "private redis-server" in line or "Application startup" in line]
    assert len(own) >= 2 and all(json.loads(line)["level"] == "INFO" for line in own), own
    assert models["sd21"]["base"] != models["sd15"]["base"]
    for name, answer in answers.items():
        model = models[name]
        assert answer["model"] == name and answer["model_version"] == model["version"]
        for key in ("mid", "us6"):
            layer = model["layers"][key]
            side = model["input_size"] // layer["stride"]
            assert answer["features"][key]["shape"] == [layer["channels"], side, side]
    assert answers["sd21"]["features"]["us6"]["shape"] != answers["sd15"]["features"]["us6"][
        "shape"]


# Loaded at the start of every Python process of the test's `serve` (PYTHONPATH): in the
# worker named ...-w1 only, each new version loads SLOW_S later, so the two workers are
# ready at different times, as a GPU worker loading a big model beside another would be.
# Without the switch each would serve the new version on its own, and the test fails.
SLOW_WORKER = """
import os
if os.environ.get("CLEANDIFT_WORKER_ID", "").endswith("-w1"):
    import time
    from cleandift.service.worker import reload

    _init = reload.RegistryWatcher.__init__

    def init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        load = self.load

        def slow(path):
            time.sleep(float(os.environ["SLOW_S"]))
            with open(os.environ["SLOW_MARK"], "a") as mark:
                mark.write(str(path) + "\\n")
            return load(path)

        self.load = slow

    reload.RegistryWatcher.__init__ = init
"""


def test_two_serve_workers_switch_versions_as_one_under_load(
        demo_dir, cache_dir, unet_files, tmp_path):  # noqa: F811
    reg = tmp_path / "reg"
    publish(reg, unet_files[0], demo_dir)
    images = [encode(textured_image(160, 120, seed), "PNG") for seed in range(30)]
    hooks, mark = tmp_path / "hooks", tmp_path / "slow.log"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_WORKER)
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    with serving(["--model", str(reg / "m"), "--workers", "2"], cache_dir,
                 tmp_path / "serve.log", CLEANDIFT_RELOAD_POLL_S="0.2", PYTHONPATH=path,
                 SLOW_S="3", SLOW_MARK=str(mark)) as url:
        clients = Clients(url, images, n=4)
        try:
            clients.wait_for("v1")
            publish(reg, unet_files[1], demo_dir)
            clients.wait_for("v2")
            time.sleep(3.0)
        finally:
            clients.finish()
    assert mark.read_text().count("\n") == 1  # the second worker was slow to load v2
    assert {status for *_, status in clients.seen} == {200}
    assert clients.went_back("v2") == []
    assert sum(v == "v1" for _, _, v, _ in clients.seen) > 0
