"""Several models in one deployment: each its own queue, chosen by `model` (form field,
JSON key or query), listed by /v1/models; an unknown name is 404 naming the served ones."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from cleandift.service.queue.keys import Keys
from tests.service.service_helpers import ApiServer, WorkerThread, metric, redis_client, wait_ready


@pytest.fixture(scope="module")
def demo15_extractor(cache_dir):
    from cleandift import load_extractor

    return load_extractor("demo15", device="cpu", cache_dir=cache_dir)


@pytest.fixture
def two_models(settings, extractor, demo15_extractor):
    """An API serving `sd21` (the demo, SD 2.1-shaped) and `sd15` (demo15), a worker each."""
    fleet = settings.model_copy(update={"models": ["sd21", "sd15"]})
    with ApiServer(fleet) as api, \
            WorkerThread(fleet.model_copy(update={"model_name": "sd21"}), extractor), \
            WorkerThread(fleet.model_copy(update={"model_name": "sd15"}), demo15_extractor), \
            httpx.Client(base_url=api.url, timeout=60) as client:
        wait_ready(client)
        yield client


def test_each_model_answers_with_its_own_layers_and_name(two_models, jpeg, extractor,
                                                         demo15_extractor):
    files = {"image": ("a.jpg", jpeg, "image/jpeg")}
    default = two_models.post("/features", files=files, data={"layers": "us3"}).json()
    by_form = two_models.post("/features", files=files,
                              data={"layers": "us3", "model": "sd15"}).json()
    by_query = two_models.post("/features?model=sd15", files=files,
                               data={"layers": "us3"}).json()
    by_json = two_models.post("/features", json={"image": base64.b64encode(jpeg).decode(),
                                                 "layers": ["us3"], "model": "sd15"}).json()
    assert default["model"] == "sd21" and default["model_version"] == extractor.info.version
    channels = {name: info.channels for name, info in demo15_extractor.info.layers.items()}
    for answer in (by_form, by_query, by_json):
        assert answer["model"] == "sd15"
        assert answer["model_version"] == demo15_extractor.info.version
        assert answer["features"]["us3"]["shape"][0] == channels["us3"]
    assert by_form["features"]["us3"]["shape"] != default["features"]["us3"]["shape"]
    matches = two_models.post("/correspond", data={"model": "sd15", "points": "[[10, 10]]"},
                              files={"source": ("s.jpg", jpeg), "target": ("t.jpg", jpeg)})
    assert matches.status_code == 200 and matches.json()["model"] == "sd15"


def test_models_are_listed_and_unknown_names_refused(two_models, jpeg, settings):
    listing = two_models.get("/v1/models").json()
    assert listing["name"] == "sd21" and listing["default_model"] == "sd21"
    assert listing["served"] == ["sd21", "sd15"]
    assert {m["name"] for m in listing["models"]} == {"sd21", "sd15"}
    one = two_models.get("/v1/models/sd15").json()
    assert one["name"] == "sd15" and one["base"] != listing["base"] and "limits" in one
    missing = two_models.get("/v1/models/sd3")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert "sd21, sd15" in missing.json()["detail"]
    files = {"image": ("a.jpg", jpeg, "image/jpeg")}
    for bad in (two_models.post("/features?model=nope", files=files),
                two_models.post("/features", files=files, data={"model": "nope"}),
                two_models.post("/correspond?model=nope",
                                files={"source": ("s.jpg", jpeg), "target": ("t.jpg", jpeg)})):
        assert bad.status_code == 404 and "sd21, sd15" in bad.json()["detail"], bad.text
    both = two_models.post("/features?model=sd15", files=files, data={"model": "sd21"})
    assert both.status_code == 422 and "name one" in both.json()["detail"]
    long = two_models.post("/features?model=" + "x" * 300, files=files)
    assert long.status_code == 422
    keys = Keys(settings.queue_prefix)
    r = redis_client(settings)
    assert r.xlen(keys.for_model("sd15").jobs) == 0 and not r.exists(keys.jobs)  # none queued


def test_each_model_has_its_own_queue_and_metrics(two_models, jpeg, settings):
    two_models.post("/features?model=sd15", files={"image": ("a.jpg", jpeg, "image/jpeg")})
    text = two_models.get("/metrics").text
    assert metric(text, "cleandift_workers_alive", model="sd15") == 1
    assert metric(text, "cleandift_workers_alive", model="sd21") == 1
    assert metric(text, "cleandift_model_info", model="sd15", name="sd15") == 1
    assert metric(text, "cleandift_requests_total", route="/features", model="sd15") == 1
    deadline = time.monotonic() + 10  # the heartbeat carries each worker's figures
    while metric(workers := two_models.get("/metrics/workers").text,
                 "cleandift_images_processed_total", model="sd15") < 1:
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)
    assert metric(workers, "cleandift_images_processed_total", model="sd21") == 0
    ready = two_models.get("/readyz").json()
    assert ready["models"].keys() == {"sd21", "sd15"} and ready["workers"] == 2


def test_an_unnamed_model_answers_to_the_name_its_workers_report(service, jpeg, extractor):
    files = {"image": ("a.jpg", jpeg, "image/jpeg")}
    named = service.post(f"/features?model={extractor.info.name}", files=files)
    assert named.status_code == 200 and named.json()["model"] == extractor.info.name
    other = service.post("/features?model=sd15", files=files)
    assert other.status_code == 404 and extractor.info.name in other.json()["detail"]
    assert service.get(f"/v1/models/{extractor.info.name}").json()["name"] == extractor.info.name
    assert service.get("/v1/models").json()["served"] == [extractor.info.name]


def test_the_client_and_extract_dataset_choose_a_model(two_models, jpeg, tmp_path,
                                                       demo15_extractor):
    from typer.testing import CliRunner

    from cleandift.cli import app
    from cleandift.client import Client
    from cleandift.datasets import FeatureDataset
    from tests.cleandift.test_bulk import write_folder

    url = str(two_models.base_url)
    with Client(url, model="sd15") as client:
        features = client.features(jpeg, "us6")
        assert features.model == "sd15" and client.models("sd15")["name"] == "sd15"
        assert client.features(jpeg, "us6", model="sd21").model == "sd21"
        assert client.correspond(jpeg, jpeg, points=[[5, 5]])["model"] == "sd15"
    channels = demo15_extractor.info.layers["us6"].channels
    assert features["us6"].shape[0] == channels
    root = write_folder(tmp_path / "images", 3)
    run = CliRunner().invoke(app, ["extract-dataset", str(root), "--out", str(tmp_path / "out"),
                                   "--service", url, "--model", "sd15", "--layers", "us6"])
    assert run.exit_code == 0, run.output
    item = next(iter(FeatureDataset(tmp_path / "out")))
    assert item.meta["model"] == "sd15" and item.features["us6"].shape[0] == channels


def test_cleandift_info_prints_what_v1_models_answers(service, settings):
    import json

    from typer.testing import CliRunner

    from cleandift.cli import app

    env = {"CLEANDIFT_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
           "CLEANDIFT_MAX_JOB_COST": str(settings.max_job_cost)}
    printed = CliRunner().invoke(app, ["info", "--model", str(settings.model)], env=env)
    assert printed.exit_code == 0, printed.output
    body = printed.stdout[printed.stdout.index("{"):]
    assert json.loads(body) == service.get("/v1/models").json()
