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

from cleandift.contract import UsageError
from cleandift.datasets import FeatureDataset, read_index
from cleandift.datasets.sources import ItemError, ReadLimits, Record, load_records, read_image_bytes
from cleandift.datasets.storage import LocalStore, open_store
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_file_url_destination_is_a_local_folder(tmp_path, demo_dir):
    images = write_folder(tmp_path / "images", 5, corrupt=False)
    plain = extract(images, tmp_path / "plain", "--model", str(demo_dir))
    url = extract(f"file://{images}", f"file://{tmp_path}/new/out", "--model", str(demo_dir))
    assert plain.exit_code == url.exit_code == 0, url.output
    assert isinstance(open_store(f"file://{tmp_path}/new/out"), LocalStore)
    assert sorted(p.name for p in (tmp_path / "new" / "out").iterdir()) == \
        sorted(p.name for p in (tmp_path / "plain").iterdir())
    for path in (tmp_path / "plain").iterdir():  # the manifest names its source as given
        there = (tmp_path / "new" / "out" / path.name).read_bytes()
        assert there.replace(b"file://", b"") == path.read_bytes()


def _commit(store, number: int, keys: list[str]) -> None:
    shard = f"shard-{number:05d}.safetensors"
    tensors = {f"{i:06d}/us6": torch.full((2, 2), float(number)) for i in range(len(keys))}
    store.commit(shard, tensors, {}, [{"key": k, "shard": shard, "entry": i}
                                      for i, k in enumerate(keys)])


def test_either_index_layout_reads_and_resumes_on_a_disk_and_at_a_url(tmp_path, memory):
    fs, root = memory
    local, remote = open_store(tmp_path / "disk"), open_store(f"memory://{root}/bucket")
    for store in (local, remote):
        _commit(store, 0, ["a", "b"])
    assert (tmp_path / "disk" / "index.jsonl").is_file() and fs.isdir(f"{root}/bucket/index.d")
    fs.get(f"{root}/bucket", str(tmp_path / "from-bucket"), recursive=True)
    fs.put(str(tmp_path / "disk"), f"{root}/from-disk", recursive=True)
    copies = [open_store(tmp_path / "from-bucket"), open_store(f"memory://{root}/from-disk")]
    for store in copies:
        assert store.read_index() == local.read_index() == remote.read_index()
        _commit(store, 1, ["c"])  # resumed in the layout it holds
        assert [row["key"] for row in store.read_index()] == ["a", "b", "c"]
    assert not (tmp_path / "from-bucket" / "index.jsonl").exists()
    assert not fs.exists(f"{root}/from-disk/index.d")
    (tmp_path / "from-bucket" / "index.jsonl").write_text("")
    with pytest.raises(UsageError, match="both index.jsonl and index.d"):
        open_store(tmp_path / "from-bucket").read_index()


def test_a_folder_at_a_url_lists_in_the_order_of_the_same_folder_on_disk(tmp_path, memory):
    fs, root = memory
    for name in ("a-b.jpg", "a.b.jpg", "a/b.jpg", "a/c/d.jpg", "a0.jpg", "B.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
        fs.pipe_file(f"{root}/{name}", b"x")
    assert [r.key for r in load_records(f"memory://{root}")] == \
        [r.key for r in load_records(str(tmp_path))]


def test_shards_keep_the_order_of_their_patterns_at_a_url_as_on_disk(tmp_path, memory):
    fs, root = memory
    tar = _tar({"k.jpg": b"x"})
    for name in ("b-1.tar", "b-2.tar", "a-1.tar"):
        (tmp_path / name).write_bytes(tar)
        fs.pipe_file(f"{root}/{name}", tar)
    pattern = "{b,a}-*.tar"
    assert [r.key for r in load_records(f"memory://{root}/{pattern}")] == \
        [r.key for r in load_records(f"{tmp_path}/{pattern}")] == \
        ["b-1.tar/k", "b-2.tar/k", "a-1.tar/k"]


def test_a_url_whose_package_is_missing_stops_the_run_not_the_item():
    with pytest.raises(UsageError, match="Protocol not known"):
        read_image_bytes(Record("nope://bucket/1.jpg", ""))


def test_a_compressed_shard_is_read_in_one_pass_not_once_per_member(tmp_path, monkeypatch):
    """A .tar.gz has no offsets: members read in listed order cost one decompression of
    the shard, not one each (which grew with the square of the shard size)."""
    from cleandift.datasets import sources

    # Written in reverse key order, with captions: records keep the archive's order, and
    # the captions are read while listing (a seek back would decompress again).
    jpegs = {f"{k:03d}.jpg": encode(textured_image(32, 24, seed=k), "JPEG")
             for k in reversed(range(40))}
    members = {}
    for name, data in jpegs.items():
        members[name] = data
        members[name.replace(".jpg", ".txt")] = f"caption {name}".encode()
    (tmp_path / "00000.tar.gz").write_bytes(_tar(members, "w:gz"))
    opened: list[str] = []
    real = sources._open_binary
    monkeypatch.setattr(sources, "_open_binary", lambda where: opened.append(where) or real(where))
    records = load_records(str(tmp_path / "00000.tar.gz"))
    assert [r.caption for r in records] == [f"caption {name}" for name in jpegs]
    assert len(opened) == 1  # the listing, captions included: one pass
    assert [read_image_bytes(r) for r in records] == list(jpegs.values())
    assert len(opened) == 2  # every image: one more pass
    assert read_image_bytes(records[3]) == jpegs["036.jpg"]  # an earlier one: reopened
    assert len(opened) == 3
