import io
import json
import tarfile

import pytest
from PIL import Image

from cleandift.datasets.sources import expand_braces, load_records
from cleandift.trainer.data import BatchStream
from tests.corpus import encode, textured_image


def test_expand_braces():
    assert expand_braces("s/{00008..00011}.tar") == [
        "s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    textured_image(40, 30, 1).save(root / "a.jpg")
    (root / "a.txt").write_text("a cat\n")
    textured_image(40, 30, 2).save(root / "sub" / "b.png")
    (root / "sub" / "b.json").write_text(json.dumps({"caption": "a dog", "w": 1}))
    textured_image(40, 30, 3).convert("RGB").save(root / "sub" / "c.webp")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "notes.md").write_text("ignored")
    return root


def test_folder_records_with_sidecars(folder):
    records = {r.source.split("/")[-1]: r.caption for r in load_records(str(folder))}
    assert records == {"a.jpg": "a cat", "broken.jpg": "", "b.png": "a dog", "c.webp": ""}


def test_corrupt_images_are_skipped_and_counted(folder):
    stream = BatchStream(load_records(str(folder)), size=64, batch_size=6, seed=0)
    pixels, captions = stream.next_batch()
    assert pixels.shape == (6, 3, 64, 64) and len(captions) == 6
    assert stream.skipped >= 1


def test_tar_shards_as_img2dataset_writes_them(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                for name, data in ((f"{key}.jpg", encode(textured_image(32, 32, i), "JPEG")),
                                   (f"{key}.txt", f"caption {shard}-{i}".encode()),
                                   (f"{key}.json", json.dumps({"caption": "x"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    records = load_records(str(tmp_path / "{00000..00001}.tar"))
    assert len(records) == 6
    stream = BatchStream(records, size=32, batch_size=4, seed=0)
    pixels, captions = stream.next_batch()
    assert pixels.shape == (4, 3, 32, 32) and stream.skipped == 0
    assert all(c in ("x",) or c.startswith("caption") for c in captions)


def test_order_is_seeded_and_resumable(folder):
    records = [r for r in load_records(str(folder)) if "broken" not in r.source]
    a = BatchStream(records, size=32, batch_size=2, seed=3)
    batches = [a.next_batch()[1] for _ in range(4)]
    b = BatchStream(records, size=32, batch_size=2, seed=3)
    b.next_batch()
    resumed = BatchStream(records, size=32, batch_size=2, seed=3, cursor=b.cursor)
    assert [resumed.next_batch()[1] for _ in range(3)] == batches[1:]


def test_no_images_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "{0..3}.tar"))
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    assert len(load_records(str(tmp_path))) == 1
