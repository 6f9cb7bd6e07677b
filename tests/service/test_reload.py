"""Hot reload under load: new versions are picked up between batches, broken ones refused,
old weights freed, rollback by promote; the trainer's announcement triggers it at once."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from cleandift import load_extractor, registry
from cleandift.trainer.cli import publish_existing
from cleandift.trainer.publish import publish_weights
from tests.corpus import encode
from tests.service.service_helpers import metric, running_service, wait_metric

pytestmark = pytest.mark.integration


@pytest.fixture
def unet_files(tmp_path, extractor):
    """Three distinct flat UNet files on the demo base."""
    files = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        state = {k: (v + 0.02 * torch.randn(v.shape, generator=gen)).contiguous()
                 for k, v in extractor.unet.state_dict().items()}
        path = tmp_path / f"unet{seed}.safetensors"
        save_file(state, str(path))
        files.append(path)
    return files


def publish(reg: Path, unet: Path, demo_dir: Path, redis_url: str | None = None,
            channel: str = "") -> str:
    manifest = {"base": str(demo_dir), "input_size": 256, "student_timestep": 261.0}
    version, _ = publish_weights(reg, "m", unet, manifest, redis_url=redis_url, channel=channel)
    return version


class Load:
    """Requests in a loop on a thread, recording (status, model_version)."""

    def __init__(self, client: httpx.Client, image: bytes) -> None:
        self.client, self.image, self.seen = client, image, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            r = self.client.post("/features", files={"image": ("x.png", self.image)})
            self.seen.append((r.status_code, r.json().get("model_version")))

    def wait_for(self, version: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.seen or self.seen[-1][1] != version:
            assert time.monotonic() < deadline, f"never served {version}: {self.seen[-3:]}"
            time.sleep(0.05)


@contextmanager
def watched_service(settings, reg: Path, demo_dir: Path, first_unet: Path, poll_s: float):
    """v1 published, then the service serving REG/m and following it."""
    publish(reg, first_unet, demo_dir)
    watched = settings.model_copy(update={"model": str(reg / "m"), "reload_poll_s": poll_s})
    with running_service(watched, load_extractor(reg / "m")) as (client, threads):
        yield client, threads


def serve_until(client: httpx.Client, image: bytes, version: str, timeout: float = 20) -> None:
    """Send requests until one is answered by `version` (swaps happen between batches)."""
    deadline = time.monotonic() + timeout
    while client.post("/features", files={"image": ("x.png", image)}).json()[
            "model_version"] != version:
        assert time.monotonic() < deadline, f"never served {version}"


def versions_in_order(seen):
    order = []
    for _, version in seen:
        if not order or order[-1] != version:
            order.append(version)
    return order


def test_new_versions_switch_once_and_broken_ones_are_refused(
    settings, extractor, demo_dir, unet_files, tmp_path, photo
):
    reg = tmp_path / "reg"
    with watched_service(settings, reg, demo_dir, unet_files[0], 0.2) as (client, _):
        load = Load(client, encode(photo, "PNG"))
        load.thread.start()
        load.wait_for("v1")
        publish(reg, unet_files[1], demo_dir)
        load.wait_for("v2")
        # A broken version: its file no longer matches the manifest's checksum.
        _, broken = registry.publish(reg, "m", {registry.UNET_FILE: unet_files[2]}, {
            "base": str(demo_dir), "input_size": 256})
        (broken / registry.UNET_FILE).write_bytes(b"corrupt")
        text = wait_metric(client, "cleandift_reloads_total", 1, result="failed")
        time.sleep(0.5)
        load.stop.set()
        load.thread.join()
        assert client.get("/v1/models").json()["version"] == "v2"
    assert metric(text, "cleandift_reloads_total", result="failed") == 1
    assert metric(text, "cleandift_reloads_total", result="ok") == 1
    assert {status for status, _ in load.seen} == {200}
    assert versions_in_order(load.seen) == ["v1", "v2"]


def test_the_served_version_never_lags_an_answer(settings, extractor, demo_dir, unet_files,
                                                 tmp_path, photo):
    """Once a client holds an answer of version N, /v1/models and the ETag say N too (the
    API's 1 s model cache once reported the previous version after a reload)."""
    reg = tmp_path / "reg"
    image = {"image": ("x.png", encode(photo, "PNG"))}
    with watched_service(settings, reg, demo_dir, unet_files[0], 0.05) as (client, _):
        first = client.post("/features", files=image)
        publish(reg, unet_files[1], demo_dir)
        deadline = time.monotonic() + 20
        while client.post("/features", files=image).json()["model_version"] != "v2":
            assert time.monotonic() < deadline, "never served v2"
        assert client.get("/v1/models").json()["version"] == "v2"
        again = client.post("/features", files=image,
                            headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 200 and again.json()["model_version"] == "v2"


def test_old_weights_are_freed_and_promote_rolls_back(
    settings, extractor, demo_dir, unet_files, tmp_path, photo
):
    reg = tmp_path / "reg"
    with watched_service(settings, reg, demo_dir, unet_files[0], 0.1) as (client, threads):
        holder = threads[0].worker.model
        image = encode(photo, "PNG")
        old = []
        for i in range(1, 5):
            if i > 1:  # the first model is also held by this test's harness
                old.append(weakref.ref(holder.current))
            publish(reg, unet_files[i % 3], demo_dir)
            deadline = time.monotonic() + 20
            while holder.current.info.version != f"v{i + 1}":
                client.post("/features", files={"image": ("x.png", image)})  # swaps between batches
                assert time.monotonic() < deadline
        gc.collect()
        assert all(ref() is None for ref in old), "replaced models must be freed"
        assert holder.current.info.version == "v5"
        registry.promote(reg, "m", "v2")
        serve_until(client, image, "v2")


def test_the_trainers_announcement_triggers_the_reload(
    settings, extractor, demo_dir, unet_files, tmp_path, photo, redis_url
):
    reg = tmp_path / "reg"
    channel = registry.announce_channel(settings.queue_prefix)
    # Polling is too slow to matter here: only the Redis message can explain a quick swap.
    with watched_service(settings, reg, demo_dir, unet_files[0], 120) as (client, _):
        time.sleep(0.3)  # let the watcher subscribe
        publish(reg, unet_files[1], demo_dir, redis_url=redis_url, channel=channel)
        serve_until(client, encode(photo, "PNG"), "v2")


def test_publish_command_checks_the_file_against_its_base(demo_dir, unet_files, tmp_path,
                                                          cache_dir):
    import typer

    version, path = publish_existing(tmp_path, "official", unet_files[0], str(demo_dir), 261.0,
                                     None, "c", cache_dir)
    assert version == "v1" and (path / registry.UNET_FILE).is_file()
    bad = tmp_path / "bad.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(typer.BadParameter, match="missing"):
        publish_existing(tmp_path, "official", bad, str(demo_dir), 261.0, None, "c", cache_dir)
    assert registry.list_versions(tmp_path, "official") == ["v1"]


def test_a_reload_drops_exactly_the_old_versions_cached_maps(
    cached_settings, extractor, demo_dir, unet_files, tmp_path, photo, redis_url
):
    import redis as redis_lib

    reg = tmp_path / "reg"
    image = encode(photo, "PNG")
    with watched_service(cached_settings, reg, demo_dir, unet_files[0], 0.1) as (client, threads):
        worker = threads[0].worker
        assert client.post("/features", files={"image": image}).headers["x-cache"] == "miss"
        assert client.post("/features", files={"image": image}).headers["x-cache"] == "hit"
        # An entry of another model stays whatever happens to m.
        worker.cache.put(["other|v7|x|256|clean|p"], [{"us6": torch.ones(3)}])
        publish(reg, unet_files[1], demo_dir)
        serve_until(client, image, "v2")
        memory = list(worker.cache.memory._entries)
        shared = redis_lib.Redis.from_url(redis_url)
        index = f"{cached_settings.queue_prefix}:cache:index:"
        assert not any(key.startswith("m|v1|") for key in memory)
        assert any(key.startswith("other|v7|") for key in memory)
        assert not shared.exists(index + "m|v1|") and shared.exists(index + "other|v7|")
        assert client.post("/features", files={"image": image}).headers["x-cache"] == "hit"
