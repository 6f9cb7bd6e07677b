"""Datasets from and to fsspec URLs (fsspec's in-memory filesystem standing in for object
storage): the same rows and shard bytes as with local folders, resumable, readable by
`FeatureDataset`; tar members read by offset; bad URLs and oversized objects refused."""

from __future__ import annotations

import io
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from cleandift.dataset import FeatureDataset, read_index
from cleandift.sources import ItemError, ReadLimits, load_records, read_image_bytes
from tests.cleandift.test_bulk import extract, write_folder
from tests.corpus import encode, textured_image


@pytest.fixture
def memory() -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """fsspec's memory filesystem and a root of this test's own, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/t-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_source_and_destination_equal_a_local_run(tmp_path, demo_dir, memory):
    fs, root = memory
    images = write_folder(tmp_path / "images", 9)  # 9 images and a corrupt one
    (images / "a" / "001.txt").write_text("a caption")
    fs.put(str(images), f"{root}/src", recursive=True)
    local = extract(images, tmp_path / "out", "--model", str(demo_dir))
    remote = extract(f"memory://{root}/src", f"memory://{root}/out", "--model", str(demo_dir))
    assert local.exit_code == remote.exit_code == 0, remote.output
    assert local.output.splitlines()[-1] == remote.output.splitlines()[-1]  # the counts

    rows = read_index(tmp_path / "out")
    assert read_index(f"memory://{root}/out") == rows and len(rows) == 10
    shards = sorted(p.name for p in (tmp_path / "out").glob("shard-*"))
    assert len(shards) == 3
    for name in shards:
        assert fs.cat_file(f"{root}/out/{name}") == (tmp_path / "out" / name).read_bytes()
    here, there = FeatureDataset(tmp_path / "out"), FeatureDataset(f"memory://{root}/out")
    assert there.keys() == here.keys() and there.errors == here.errors
    for a, b in zip(here, there):
        assert torch.equal(a.features["us6"], b.features["us6"]) and a.meta == b.meta
    assert [r.caption for r in load_records(f"memory://{root}/src")] == \
        [r.caption for r in load_records(str(images))]


def test_a_remote_run_resumes_after_its_last_whole_shard(tmp_path, demo_dir, memory):
    fs, root = memory
    fs.put(str(write_folder(tmp_path / "images", 9)), f"{root}/src", recursive=True)
    out = f"memory://{root}/out"
    assert extract(f"memory://{root}/src", out, "--model", str(demo_dir)).exit_code == 0
    before = {p: fs.cat_file(p) for p in fs.find(f"{root}/out")}
    # As if killed after shard 1's object was written but before its index part:
    fs.rm(f"{root}/out/index.d/shard-00002.jsonl")
    fs.rm(f"{root}/out/index.d/shard-00001.jsonl")
    fs.pipe_file(f"{root}/out/shard-00001.safetensors", b"half a shard")
    again = extract(f"memory://{root}/src", out, "--model", str(demo_dir))
    assert again.exit_code == 0 and '"resumed_after": 4' in again.output
    assert {p: fs.cat_file(p) for p in fs.find(f"{root}/out")} == before


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_shards_behind_a_url_read_each_member_as_tarfile_does(memory, mode):
    fs, root = memory
    jpegs = {f"{k:03d}.jpg": encode(textured_image(40 + k, 30, seed=k), "JPEG")
             for k in range(3)}
    for shard in range(2):
        fs.pipe_file(f"{root}/{shard:05d}.tar", _tar(
            {f"s{shard}-{name}": data for name, data in jpegs.items()} | {"s0-000.txt": b"cat"},
            mode))
    records = load_records(f"memory://{root}/{{00000..00001}}.tar")
    assert [r.key for r in records] == [f"{s:05d}.tar/s{s}-{k:03d}" for s in range(2)
                                        for k in range(3)]
    assert records[0].caption == "cat" and (records[0].offset >= 0) == (mode == "w")
    for record in records:
        assert read_image_bytes(record) == jpegs[record.image.split("-", 1)[1]]
    with pytest.raises(ItemError, match="the limit is 100"):
        read_image_bytes(records[0], ReadLimits(max_bytes=100))


def test_remote_objects_are_read_within_the_limits(memory):
    fs, root = memory
    fs.pipe_file(f"{root}/big.jpg", b"x" * 2000)
    fs.mkdir(f"{root}/folder.jpg")
    [big] = [r for r in load_records(f"memory://{root}") if r.key == "big.jpg"]
    with pytest.raises(ItemError, match="2000 bytes; the limit is 1000"):
        read_image_bytes(big, ReadLimits(max_bytes=1000))
    assert read_image_bytes(big) == b"x" * 2000
    folder = big.__class__(f"memory://{root}/folder.jpg", "")
    with pytest.raises(ItemError, match="not a file"):
        read_image_bytes(folder)


def test_a_list_file_behind_a_url_names_objects_beside_it(memory):
    fs, root = memory
    fs.pipe_file(f"{root}/photos/1.jpg", b"one")
    fs.pipe_file(f"{root}/list.txt", b"# photos\nphotos/1.jpg\nhttps://example.org/2.jpg\n")
    records = load_records(f"memory://{root}/list.txt")
    assert [r.key for r in records] == ["photos/1.jpg", "https://example.org/2.jpg"]
    assert read_image_bytes(records[0]) == b"one"


@pytest.mark.parametrize(("url", "says"), [
    ("nope://bucket/images", "Protocol not known"),
    ("memory://nothing-here-at-all/{0..1}.tar", "no images found"),
])
def test_bad_urls_end_the_command_with_a_message(tmp_path: Path, demo_dir, url, says):
    result = extract(url, tmp_path / "out", "--model", str(demo_dir))
    assert result.exit_code == 2 and says in result.output
