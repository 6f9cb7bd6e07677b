"""`cleandift extract-dataset`: one result per input, in order, readable by key; killed
part-way and resumed, the same bytes as an uninterrupted run; reduced outputs; sources."""

from __future__ import annotations

import filecmp
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cleandift.cli import app
from cleandift.datasets.dataset import INDEX, FeatureDataset, read_index
from cleandift.datasets.sources import load_records
from cleandift.images import decode_for_model
from tests.corpus import encode, textured_image


def write_folder(root: Path, count: int, corrupt: bool = True) -> Path:
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        textured_image(80 + i, 64, seed=i).save(folder / f"{i:03d}.jpg", quality=90)
    if corrupt:
        (root / "b" / "zz-corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def extract(source: Path | str, out: Path, *more: str):
    args = ["extract-dataset", str(source), "--out", str(out), "--layers", "us6,mid",
            "--size", "64", "--shard-size", "4", "--batch-size", "2", *more]
    return CliRunner().invoke(app, args)


def test_every_input_has_one_row_in_order_and_reads_back(tmp_path, demo_dir, extractor):
    root = write_folder(tmp_path / "images", 9)
    result = extract(root, tmp_path / "out", "--model", str(demo_dir))
    assert result.exit_code == 0, result.output
    rows = read_index(tmp_path / "out")
    keys = [r.key for r in load_records(str(root))]
    assert [row["key"] for row in rows] == keys and len(keys) == 10
    [bad] = [row for row in rows if "error" in row]
    assert bad["key"] == "b/zz-corrupt.jpg"
    data = FeatureDataset(tmp_path / "out")
    assert len(data) == 9 and data.errors[0]["key"] == "b/zz-corrupt.jpg"
    item = data["a/001.jpg"]
    assert item.features["us6"].shape == (64, 4, 4) and item.features["us6"].dtype == torch.float16
    assert item.meta["model_version"] == extractor.info.version
    assert item.meta["image_size"] == [81, 64]
    pixels, _ = decode_for_model((root / "a" / "001.jpg").read_bytes(), 64, max_bytes=1 << 26,
                                 max_pixels=1 << 26)
    direct = extractor.features(torch.from_numpy(pixels[None].copy()), ["us6"])["us6"][0]
    # the same maps, to float16 rounding (a batch of 2 there, of 1 here)
    torch.testing.assert_close(item.features["us6"].float(), direct.float(), atol=1e-3,
                               rtol=1e-2)
    assert [i.key for i in data] == data.keys()  # iteration, shard by shard


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_int8_grid_output_dequantizes_close_to_the_map(tmp_path, demo_dir):
    root = write_folder(tmp_path / "images", 3, corrupt=False)
    full = extract(root, tmp_path / "full", "--model", str(demo_dir), "--out-dtype", "float32",
                   "--grid", "2")
    small = extract(root, tmp_path / "small", "--model", str(demo_dir), "--out-dtype", "int8",
                    "--grid", "2")
    assert full.exit_code == 0 and small.exit_code == 0, small.output
    a, b = FeatureDataset(tmp_path / "full")[0], FeatureDataset(tmp_path / "small")[0]
    assert b.features["us6"].shape == (64, 2, 2)
    cosine = torch.nn.functional.cosine_similarity(a.features["us6"], b.features["us6"], dim=0)
    assert cosine.mean() > 0.999
    raw = FeatureDataset(tmp_path / "small", dequantize=False)[0]
    assert raw.features["us6"].dtype == torch.int8


@pytest.mark.slow  # over 2 s here: outside the unit tier
def test_a_run_with_other_options_refuses_the_folder(tmp_path, demo_dir):
    root = write_folder(tmp_path / "images", 2, corrupt=False)
    assert extract(root, tmp_path / "out", "--model", str(demo_dir)).exit_code == 0
    again = extract(root, tmp_path / "out", "--model", str(demo_dir), "--grid", "2")
    assert again.exit_code == 2 and "made differently" in again.output
    missing = extract(tmp_path / "nowhere", tmp_path / "out2", "--model", str(demo_dir))
    assert missing.exit_code == 2 and "nowhere" in missing.output


def test_only_a_committed_shard_ties_the_folder_to_a_model(tmp_path):
    """A run that fails before its first shard is committed (a service down, a model its
    actors cannot load, a commit that fails) leaves the --out free: the next try, with
    another model version, takes it. Once a shard is committed the folder is that model's
    (a resume must match), and committed rows without their manifest are refused."""
    from cleandift.contract import UsageError
    from cleandift.datasets.bulk import Options, extract_dataset

    root = write_folder(tmp_path / "images", 5, corrupt=False)
    options = Options(source=str(root), layers=["us6"], size=64, shard_size=2, batch_size=2)
    out, calls = tmp_path / "out", []

    def compute(fail_at: int, layer: str = "us6"):
        def one_batch(images: list[bytes]):
            calls.append(len(images))
            if len(calls) == fail_at:
                raise ConnectionError("the service went away")
            return [({layer: torch.ones(8, 4, 4)}, (80, 64)) for _ in images]
        return one_batch

    v1, v2, v3 = ({"model": "m", "model_version": v} for v in ("v1", "v2", "v3"))
    with pytest.raises(ConnectionError):  # before the first shard's maps
        extract_dataset(out, options, compute(fail_at=1), v1, progress=False)
    assert not (out / "manifest.json").exists() and read_index(out) == []
    with pytest.raises(KeyError):  # the first shard's commit fails (its maps lack us6)
        extract_dataset(out, options, compute(fail_at=0, layer="mid"), v3, progress=False)
    assert (out / "manifest.json").exists() and read_index(out) == []
    calls.clear()
    with pytest.raises(ConnectionError):  # v2 takes the folder; fails in its second shard
        extract_dataset(out, options, compute(fail_at=2), v2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == v2 and manifest["options"]["shard_size"] == 2
    assert [row["key"] for row in read_index(out)] == ["a/001.jpg", "a/003.jpg"]
    with pytest.raises(UsageError, match="made differently"):
        extract_dataset(out, options, compute(fail_at=0), v1, progress=False)
    calls.clear()
    counts = extract_dataset(out, options, compute(fail_at=0), v2, progress=False)
    assert counts == {"items": 5, "resumed_after": 2, "failed": 0} and calls == [2, 1]
    assert len(FeatureDataset(out)) == 5
    (out / "manifest.json").unlink()
    with pytest.raises(UsageError, match="no manifest.json"):
        extract_dataset(out, options, compute(fail_at=0), v2, progress=False)


def test_lists_and_shards_are_sources(tmp_path):
    write_folder(tmp_path / "images", 3, corrupt=False)
    (tmp_path / "list.txt").write_text("# two of them\nimages/a/001.jpg\n\nimages/b/002.jpg\n"
                                       "https://example.invalid/x.jpg\n")
    records = load_records(str(tmp_path / "list.txt"))
    assert [r.key for r in records] == ["images/a/001.jpg", "images/b/002.jpg",
                                        "https://example.invalid/x.jpg"]
    with tarfile.open(tmp_path / "s-0.tar", "w") as tar:
        for i in range(2):
            data = encode(textured_image(64, 64, i), "JPEG")
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert [r.key for r in load_records(str(tmp_path / "s-{0..0}.tar"))] == [
        "s-0.tar/00000", "s-0.tar/00001"]


def run_cli(source: Path, out: Path, demo_dir: Path, cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "CLEANDIFT_CACHE_DIR": str(cache_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "cleandift.cli", "extract-dataset", str(source), "--out", str(out),
         "--layers", "us6", "--size", "128", "--shard-size", "4", "--batch-size", "2",
         "--model", str(demo_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def lines(path: Path) -> int:
    try:
        return len((path / INDEX).read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.integration
def test_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, demo_dir, cache_dir):
    root = write_folder(tmp_path / "images", 47)  # 48 inputs, 12 shards
    straight = run_cli(root, tmp_path / "straight", demo_dir, cache_dir)
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()[-2000:]
    killed = run_cli(root, tmp_path / "resumed", demo_dir, cache_dir)
    deadline = time.monotonic() + 300
    while lines(tmp_path / "resumed") < 8:  # two shards committed, the run going on
        assert killed.poll() is None and time.monotonic() < deadline, "finished too soon"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert 8 <= lines(tmp_path / "resumed") < 48
    resumed = run_cli(root, tmp_path / "resumed", demo_dir, cache_dir)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["resumed_after"] >= 8
    a, b = tmp_path / "straight", tmp_path / "resumed"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    keys = [row["key"] for row in read_index(b)]
    assert len(keys) == 48 and len(set(keys)) == 48
