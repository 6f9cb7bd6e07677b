"""The fleet declaration (service/fleet.py) and worker placement (processes/placement.py):
pure functions, tested with a fake GPU count."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleandift.service.fleet import Fleet, FleetError, ModelPlan, fleet_of
from cleandift.service.processes.placement import place, usable_gpus
from cleandift.service.processes.serve import worker_plans
from cleandift.service.queue.keys import Keys
from cleandift.settings import Settings


def test_one_unnamed_model_is_todays_deployment():
    fleet = fleet_of(Settings(model="some/dir"))
    assert fleet == Fleet((ModelPlan(None, "some/dir"),), None)
    assert Keys("cleandift").for_model(None).jobs == "cleandift:jobs"  # KEDA configs hold


def test_named_models_from_declarations_and_the_environment(monkeypatch):
    fleet = fleet_of(Settings(models=["sd21=reg/sd21", "sd15=demo15"]))
    assert fleet.names == ["sd21", "sd15"] and fleet.default == "sd21"
    assert fleet.models[1].spec == "demo15"
    monkeypatch.setenv("CLEANDIFT_MODELS", "a=demo, b=demo15")
    monkeypatch.setenv("CLEANDIFT_DEFAULT_MODEL", "b")
    from_env = fleet_of(Settings())
    assert from_env.names == ["a", "b"] and from_env.default == "b"
    keys = Keys("cleandift").for_model("b")
    assert (keys.jobs, keys.wake, keys.dead, keys.live) == (
        "cleandift.b:jobs", "cleandift.b:wake", "cleandift.b:dead", "cleandift.b:live")
    assert keys.registry_channel == Keys("cleandift").registry_channel  # one trainer channel


def test_a_worker_gets_its_models_settings():
    fleet = fleet_of(Settings(models=["x=demo15"]))
    own = fleet.models[0].settings(Settings(models=["x=demo15"], max_batch=4))
    assert (own.model, own.model_name, own.models, own.max_batch) == ("demo15", "x", [], 4)


FLEET = """
default = "sd15"
[models.sd21]
spec = "registry/cleandift-sd21"
dtype = "fp16"
devices = [0, 1]
max_batch = 8
[models.sd15]
spec = "demo15"
workers = 1
device = "cpu"
"""


def test_the_fleet_file_carries_per_model_settings(tmp_path: Path):
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET)
    fleet = fleet_of(Settings(fleet_file=path))
    sd21, sd15 = fleet.models
    assert fleet.default == "sd15"
    assert sd21.overrides == {"dtype": "float16", "max_batch": 8} and sd21.devices == (0, 1)
    assert sd15.overrides == {"device": "cpu"} and sd15.workers == 1


@pytest.mark.parametrize("text, says", [
    ("[models.a]\nspec = 1\n", "spec must be a string"),
    ("[models.a]\nspec = 'demo'\nbatch = 3\n", "unknown keys ['batch']"),
    ("[models.a]\nspec = 'demo'\nmax_batch = 0\n", "max_batch"),
    ("[models.a]\nspec = 'demo'\ndtype = 'int4'\n", "dtype"),
    ("[models.a]\nspec = 'demo'\ndevices = ['0']\n", "list of GPU indices"),
    ("[models.a]\nspec = 'demo'\nworkers = 0\n", "positive integer"),
    ("[models.a]\nspec = 'demo'\ndevice = 'tpu'\n", "device 'tpu'"),
    ("[models.'a b']\nspec = 'demo'\n", "model name 'a b'"),
    ("default = 'z'\n[models.a]\nspec = 'demo'\n", "default model 'z'"),
    ("models = 3\n", "no [models.NAME] table"),
    ("[models.a\n", "fleet file"),
    ("extra = 1\n[models.a]\nspec = 'demo'\n", "unknown keys in the fleet file"),
])
def test_a_bad_fleet_file_is_refused_by_name(tmp_path: Path, text: str, says: str):
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(FleetError, match=None) as caught:
        fleet_of(Settings(fleet_file=path))
    assert says in str(caught.value)


def test_bad_declarations_are_refused():
    with pytest.raises(FleetError, match="declared twice"):
        fleet_of(Settings(models=["a=demo", "a=demo15"]))
    with pytest.raises(FleetError, match="model name"):
        fleet_of(Settings(models=["a:b=demo"]))
    with pytest.raises(FleetError, match="no named models"):
        fleet_of(Settings(default_model="a"))
    with pytest.raises(ValueError, match="model_name"):
        Settings(model_name="a:b")
    with pytest.raises(ValueError, match="devices"):
        Settings(devices="0,,1")


def _fleet(*plans: ModelPlan) -> Fleet:
    return Fleet(plans, plans[0].name)


def test_every_visible_gpu_gets_a_worker_by_default():
    plans = place(_fleet(ModelPlan("a", "demo")), None, visible=8, cpu_workers=1)
    assert [p.gpu for p in plans] == list(range(8))
    assert [p.index for p in plans] == list(range(8))
    assert [p.device_label for p in plans[:2]] == ["cuda:0", "cuda:1"]


def test_devices_choose_gpus_and_cpu_keeps_the_worker_count():
    assert [p.gpu for p in place(_fleet(ModelPlan("a", "x")), "0,1,3", 4, 1)] == [0, 1, 3]
    assert [p.gpu for p in place(_fleet(ModelPlan("a", "x")), "cpu", 4, 2)] == [None, None]
    assert [p.gpu for p in place(_fleet(ModelPlan("a", "x")), None, 0, 3)] == [None] * 3
    with pytest.raises(FleetError, match="GPU 5"):
        usable_gpus("0,5", 2)
    with pytest.raises(FleetError, match="twice"):
        usable_gpus("1,1", 2)


def test_models_share_or_split_gpus_as_the_fleet_says():
    fleet = _fleet(ModelPlan("big", "x", devices=(0, 1, 2)),
                   ModelPlan("small", "y", devices=(3,)),
                   ModelPlan("tiny", "z", devices=(3,)),
                   ModelPlan("twice", "w", devices=(2,), workers=2),
                   ModelPlan("cpu", "v", {"device": "cpu"}, workers=1))
    placed = [(p.model.name, p.gpu) for p in place(fleet, None, visible=4, cpu_workers=1)]
    assert placed == [("big", 0), ("big", 1), ("big", 2), ("small", 3), ("tiny", 3),
                      ("twice", 2), ("twice", 2), ("cpu", None)]
    with pytest.raises(FleetError, match="GPU 3"):
        place(_fleet(ModelPlan("a", "x", devices=(3,))), "0,1", 4, 1)
    with pytest.raises(FleetError, match="cuda:2"):
        place(_fleet(ModelPlan("a", "x", {"device": "cuda:2"})), None, 2, 1)
    with pytest.raises(FleetError, match="no GPU"):
        place(_fleet(ModelPlan("a", "x", {"device": "cuda"})), None, 0, 1)


def test_serve_places_an_explicit_worker_count_round_robin():
    settings = Settings(models=["a=demo", "b=demo15"], workers=3)
    plans = worker_plans(settings, gpus=2)
    assert [(p.model.name, p.gpu) for p in plans] == [
        ("a", 0), ("a", 1), ("a", 0), ("b", 0), ("b", 1), ("b", 0)]
    assert [p.gpu for p in worker_plans(Settings(), gpus=2)] == [0, 1]
    assert [p.gpu for p in worker_plans(Settings(device="cuda:1"), gpus=2)] == [1]
    assert [p.gpu for p in worker_plans(Settings(device="cpu", workers=2), gpus=2)] == [
        None, None]


def _child_env(monkeypatch, parent: str | None, plans) -> list[tuple[str, str]]:
    """(CUDA_VISIBLE_DEVICES, GPU label) that serve gives each GPU worker's process."""
    import redis

    from cleandift.service.metrics import GPU_LABEL_ENV
    from cleandift.service.processes import serve

    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    seen = []

    def popen(argv, env, **_kwargs):
        seen.append((env["CUDA_VISIBLE_DEVICES"], env[GPU_LABEL_ENV]))
        raise RuntimeError("not started")

    monkeypatch.setattr(serve.subprocess, "Popen", popen)
    client = redis.Redis(port=1)  # never reached: the children are not started
    for plan in plans:
        with pytest.raises(RuntimeError):
            serve.worker_child(Settings(), plan, client).start()
    return seen


def test_each_gpu_worker_sees_its_own_physical_gpu(monkeypatch):
    """serve numbers the GPUs it sees; under CUDA_VISIBLE_DEVICES=2,3 (Slurm, a shared box)
    its workers must get GPUs 2 and 3, not 0 and 1."""
    plans = worker_plans(Settings(), gpus=2)
    assert _child_env(monkeypatch, None, plans) == [("0", "cuda:0"), ("1", "cuda:1")]
    assert _child_env(monkeypatch, "2,3", plans) == [("2", "cuda:2"), ("3", "cuda:3")]
    mig = "MIG-4a5b,MIG-9c8d"
    assert [gpu for gpu, _ in _child_env(monkeypatch, mig, plans)] == ["MIG-4a5b", "MIG-9c8d"]


def test_serve_refuses_a_named_model_without_a_spec(tmp_path: Path):
    with pytest.raises(FleetError, match="'demo15' has no spec"):
        worker_plans(Settings(models=["sd21=demo", "demo15"]), gpus=0)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[models.a]\nspec = "demo"\n[models.b]\nworkers = 1\n')
    with pytest.raises(FleetError, match="'b' has no spec"):
        worker_plans(Settings(fleet_file=fleet), gpus=0)
    assert fleet_of(Settings(models=["sd21", "sd15"])).names == ["sd21", "sd15"]  # the API's
