import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from cleandift import ModelLoadError, load_extractor


@pytest.fixture(scope="module")
def student_file(tmp_path_factory, extractor):
    """A flat, diffusers-named UNet state dict, like cleandift_sd21_unet.safetensors."""
    gen = torch.Generator().manual_seed(3)
    state = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).half().contiguous()
        for k, v in extractor.unet.state_dict().items()
    }
    path = tmp_path_factory.mktemp("student") / "cleandift_demo_unet.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_flat_state_dict_loads_strictly_and_changes_features(
    demo_dir, extractor, student_file, photo
):
    path, state = student_file
    student = load_extractor(demo_dir, unet=path, device="cpu")
    for key, value in student.unet.state_dict().items():
        torch.testing.assert_close(value, state[key].float())
    assert student.info.version.startswith("unet-")
    base = extractor.extract([photo], layers=["us6"])[0]["us6"]
    new = student.extract([photo], layers=["us6"])[0]["us6"]
    assert not torch.allclose(base, new)
    # DIFT mode runs the base UNet, loaded beside the student on demand.
    dift_student = student.extract([photo], layers=["us6"], mode="dift", seeds=[1])[0]["us6"]
    dift_base = extractor.extract([photo], layers=["us6"], mode="dift", seeds=[1])[0]["us6"]
    torch.testing.assert_close(dift_student, dift_base)


def test_mismatched_state_dict_names_the_keys(demo_dir, student_file, tmp_path):
    _, state = student_file
    broken = dict(state)
    missing = "conv_out.bias"
    del broken[missing]
    broken["extra.weight"] = torch.zeros(1)
    broken["conv_in.weight"] = torch.zeros(3, 3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_extractor(demo_dir, unet=path, device="cpu")
    message = str(err.value)
    assert missing in message and "extra.weight" in message and "conv_in.weight" in message


def test_corrupt_state_dict_is_a_clear_error(demo_dir, student_file, tmp_path):
    path, _ = student_file
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read UNet weights"):
        load_extractor(demo_dir, unet=bad, device="cpu")
    pickle = tmp_path / "weights.bin"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(ModelLoadError):
        load_extractor(demo_dir, unet=pickle, device="cpu")


def test_bad_specs(tmp_path, demo_dir):
    with pytest.raises(ModelLoadError, match="no model"):
        load_extractor(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_extractor(tmp_path, device="cpu")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(demo_dir, incomplete)
    shutil.rmtree(incomplete / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        load_extractor(incomplete, device="cpu")


def test_hub_id_offline_fails_clearly():
    # conftest sets HF_HUB_OFFLINE=1: nothing is fetched.
    with pytest.raises(ModelLoadError, match="network"):
        load_extractor("cleandift-test/not-in-the-cache", device="cpu")


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_metadata_overrides_and_defaults(demo_dir, tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(demo_dir, folder)
    (folder / "cleandift.json").unlink()
    ex = load_extractor(folder, device="cpu")
    assert ex.info.input_size == 32 * 8  # unet sample_size x VAE factor
    assert ex.info.student_timestep == 261.0
    assert ex.info.default_layers == ["us6"] and ex.info.version == "base"
    meta = {"input_size": 128, "student_timestep": 300.0, "default_layers": ["us6", "us9"]}
    (folder / "cleandift.json").write_text(json.dumps(meta))
    ex = load_extractor(folder, device="cpu")
    assert (ex.info.input_size, ex.info.student_timestep) == (128, 300.0)
    assert ex.info.default_layers == ["us6", "us9"]


def test_dtype_choice():
    from cleandift.loading import pick_device_dtype

    assert pick_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("cuda", None)[1] == torch.float16
    assert pick_device_dtype("cpu", "bf16")[1] == torch.bfloat16
    with pytest.raises(ValueError):
        pick_device_dtype("cpu", "int8")


class _Tripwire:
    """Unpickling this writes a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_are_refused_never_unpickled(demo_dir, tmp_path):
    import pickle

    folder = tmp_path / "pickled"
    shutil.copytree(demo_dir, folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "unpickled"
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps(_Tripwire(str(marker))))
    with pytest.raises(ModelLoadError, match="unet"):
        load_extractor(folder, device="cpu")
    assert not marker.exists()


def test_public_base_name_hides_local_paths(extractor, demo_dir):
    assert extractor.info.base == demo_dir.name and "/" not in extractor.info.base
    assert extractor.base_spec == str(demo_dir.resolve())


def test_hub_unet_reference_offline_fails_clearly(demo_dir):
    with pytest.raises(ModelLoadError, match="hub repository CompVis/cleandift.*Offline"):
        load_extractor(demo_dir, unet="hf://CompVis/cleandift/cleandift_sd21_unet.safetensors",
                       device="cpu")
    with pytest.raises(ModelLoadError, match="expected hf://OWNER/REPO/PATH"):
        load_extractor(demo_dir, unet="hf://just-a-name", device="cpu")


def test_hub_unet_reference_goes_through_the_hub_cache(demo_dir, extractor, tmp_path,
                                                       monkeypatch):
    """`hf://OWNER/REPO/PATH@REV` asks huggingface_hub for that file (its cache answers
    offline); what it returns is loaded like a local file."""
    import huggingface_hub

    local = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in extractor.unet.state_dict().items()}, str(local))
    asked = []

    def download(repo_id, filename, revision=None, **_kw):
        asked.append((repo_id, filename, revision))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    ex = load_extractor(demo_dir, unet="hf://owner/repo/sub/unet.safetensors@v2", device="cpu")
    assert asked == [("owner/repo", "sub/unet.safetensors", "v2")]
    assert ex.info.version.startswith("unet-")


def test_an_absent_accelerator_is_a_clear_error(demo_dir):
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            load_extractor(demo_dir, device="cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(ModelLoadError, match="no MPS backend"):
            load_extractor(demo_dir, device="mps")


@pytest.mark.slow  # loads five models: outside the unit tier
def test_describe_model_finds_what_loading_finds(demo_dir, student_file, tmp_path):
    """`extract-dataset --engine ray` records these facts without loading the weights; the
    loaded model is the reference: name, version, input size and default layers agree for
    the built-in demos, a folder whose metadata overrides them, and a registry version
    whose UNet file carries its own metadata."""
    from cleandift import registry
    from cleandift.loading import describe_model

    folder = tmp_path / "overrides"
    shutil.copytree(demo_dir, folder)
    (folder / "cleandift.json").write_text(json.dumps(
        {"name": "mine", "version": "7", "input_size": 192, "default_layers": ["mid", "us6"]}))
    unet = tmp_path / "unet.safetensors"
    save_file(student_file[1], str(unet), metadata={"input_size": "320"})
    registry.publish(tmp_path / "reg", "student", {registry.UNET_FILE: unet},
                     {"base": str(folder), "default_layers": ["us3"]})
    expected = {  # written from the files above, apart from both functions
        "demo": ("cleandift-demo", "demo-seed0", 256, ["us6"]),
        "demo15": ("cleandift-demo15", "demo-seed0", 192, ["us6"]),
        folder: ("mine", "7", 192, ["mid", "us6"]),
        tmp_path / "reg" / "student": ("student", "v1", 320, ["us3"]),
    }
    for spec, facts_by_hand in expected.items():
        facts = describe_model(spec)
        info = load_extractor(spec, device="cpu").info
        assert facts is not None
        described = (facts.name, facts.version, facts.input_size, facts.default_layers)
        assert described == facts_by_hand, spec
        assert described == (info.name, info.version, info.input_size, info.default_layers)
    assert describe_model("someone/some-model") is None  # a hub id: learnt by loading


@pytest.mark.parametrize("vae_config", ["{}", "[]", "{", None])
def test_describe_model_says_which_config_it_cannot_read(demo_dir, tmp_path, vae_config):
    from cleandift.loading import describe_model

    folder = tmp_path / "model"
    shutil.copytree(demo_dir, folder)
    if vae_config is None:
        (folder / "vae" / "config.json").unlink()
    else:
        (folder / "vae" / "config.json").write_text(vae_config)
    with pytest.raises(ModelLoadError, match="cannot read the configs of"):
        describe_model(folder)
