"""The trainer end to end on the demo teacher: a subprocess run like a user's, and an
in-process check that --resume continues exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cleandift import ModelLoadError, load_extractor
from cleandift.trainer.synthetic import write_images
from cleandift.trainer.train import TrainConfig, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    list(write_images(root, 20, 96, seed=0))
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_cli_run_learns_and_publishes_a_loadable_version(tmp_path, data, cache_dir):
    reg = tmp_path / "registry"
    cmd = [sys.executable, "-m", "cleandift.cli", "train", "--data", str(data),
           "--registry", str(reg), "--name", "student", "--steps", "20", "--batch-size", "4",
           "--size", "128", "--lr", "2e-3", "--warmup", "4", "--save-every", "10",
           "--holdout", "4", "--precision", "fp32"]
    env = {**os.environ, "CLEANDIFT_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["version"] == "v1" and summary["steps"] == 20
    assert summary["fidelity_after"] > summary["fidelity_before"]
    assert 0 <= summary["warp_pck_before"] <= 1 and 0 <= summary["warp_pck_after"] <= 1

    log = [json.loads(line) for line in (reg / "student" / ".runs" / "log.jsonl").open()]
    assert [r["step"] for r in log] == list(range(1, 21))
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < first, (first, last)
    assert log[-1]["skipped"] >= 1  # the corrupt file was skipped, not fatal

    version = reg / "student" / "v1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"unet.safetensors", "heads.safetensors"}
    assert manifest["input_size"] == 128 and abs(manifest["student_timestep"] - 261) < 5
    # The warp score on the held-out images, before and after, and the gate's verdict.
    assert manifest["warps"]["images"] == manifest["warps_before"]["images"] >= 3
    assert manifest["warps"]["fingerprint"] == manifest["warps_before"]["fingerprint"]
    assert manifest["gate"]["allowed"] and manifest["warps"]["layer"] == "us6"
    heads = load_file(str(version / "heads.safetensors"))
    assert "heads.conditioning.fourier.weight" in heads and "timestep" in heads

    served = load_extractor(str(reg / "student"), device="cpu")
    assert (served.info.name, served.info.version, served.info.input_size) == ("student", "v1", 128)
    assert served.info.student_timestep == manifest["student_timestep"]

    (version / "unet.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelLoadError, match="checksum"):
        load_extractor(str(reg / "student" / "v1"), device="cpu")


def _cfg(tmp_path, data, cache_dir, steps, out):
    return TrainConfig(data=str(data), registry=tmp_path / "reg", name=out, steps=steps,
                       batch_size=2, lr=1e-3, warmup=3, size=64, precision="fp32",
                       save_every=3, holdout=2, seed=7, cache_dir=cache_dir,
                       output_dir=tmp_path / out)


def test_resume_continues_identically(tmp_path, data, cache_dir):
    _, straight = train(_cfg(tmp_path, data, cache_dir, 6, "a"))
    # A run that dies after step 4 (its last checkpoint is step 3), then is resumed.
    train(_cfg(tmp_path, data, cache_dir, 4, "b"))
    resumed = _cfg(tmp_path, data, cache_dir, 6, "b")
    resumed.resume = True
    _, path = train(resumed)
    a = load_file(str(straight / "unet.safetensors"))
    b = load_file(str(path / "unet.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    ha = load_file(str(straight / "heads.safetensors"))
    hb = load_file(str(path / "heads.safetensors"))
    for key in ha:
        torch.testing.assert_close(ha[key], hb[key], rtol=0, atol=0, msg=key)


def test_batch_size_is_global_over_two_processes(tmp_path, cache_dir):
    """Two CPU processes (torch.distributed, as `accelerate launch` starts them): a global
    batch of 4 is 2 per process, so 2 steps draw 8 samples, not 16."""
    data = tmp_path / "data"
    list(write_images(data, 12, 96, seed=1))
    env = {**os.environ, "CLEANDIFT_CACHE_DIR": str(cache_dir)}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "-m", "cleandift.cli", "train", "--data", str(data), "--registry",
            str(tmp_path / "reg"), "--name", "s", "--steps", "2", "--size", "64",
            "--holdout", "2", "--warmup", "2", "--save-every", "0"]
    done = subprocess.run([*base, "--batch-size", "4"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "reg" / "s" / "v1" / "manifest.json").read_text())
    assert manifest["data"]["processes"] == 2 and manifest["data"]["samples"] == 8
    odd = subprocess.run([*base, "--batch-size", "3"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert odd.returncode != 0 and "global batch and must divide by the 2" in odd.stderr
