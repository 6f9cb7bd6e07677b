"""Training images: an image folder with caption sidecars, or img2dataset tar shards.

Both become an indexed list of records, so the order is a seeded permutation per epoch
and a resumed run continues from the exact sample it stopped at. Corrupt images are
skipped and counted, never fatal.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cleandift.images import ImageError, decode_for_model, to_pixels

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000


@dataclass(frozen=True)
class Record:
    """Where one image (and its caption) lives: a file, or a member of a tar shard."""

    source: str  # file path or tar path
    image: str  # member name inside the tar ("" for files)
    caption: str = ""


def expand_braces(pattern: str) -> list[str]:
    """img2dataset-style shard patterns: `{00000..00009}` ranges and `{a,b}` lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    if ".." in body:
        lo, hi = body.split("..")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for option in options for p in expand_braces(head + option + tail)]


def _caption_from_sidecar(path: Path) -> str:
    for sidecar in (path.with_suffix(".txt"), path.with_suffix(".json")):
        if sidecar.is_file():
            return _parse_caption(sidecar.name, sidecar.read_bytes())
    return ""


def _parse_caption(name: str, data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    if name.endswith(".json"):
        try:
            value = json.loads(text).get("caption", "")
        except (json.JSONDecodeError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""
    return text.strip()


def folder_records(root: Path) -> list[Record]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    return [Record(str(p), "", _caption_from_sidecar(p)) for p in paths]


def tar_records(tar_path: str) -> list[Record]:
    """Group a shard's members by key (file name without extension), as webdataset does."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and "." in member.name:
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext.lower()] = member
        records = []
        for _key, members in sorted(groups.items()):
            image = next((m for ext, m in members.items() if "." + ext in IMAGE_EXTS), None)
            if image is None:
                continue
            caption = ""
            for ext in ("txt", "json"):
                if ext in members:
                    data = tar.extractfile(members[ext]).read()  # type: ignore[union-attr]
                    caption = _parse_caption(members[ext].name, data) or caption
            records.append(Record(tar_path, image.name, caption))
    return records


def load_records(data: str) -> list[Record]:
    """A folder (recursive) or shard pattern(s) -> records in a fixed order."""
    path = Path(data)
    if path.is_dir():
        records = folder_records(path)
    else:
        shards = [s for p in expand_braces(data) for s in sorted(glob.glob(p))]
        if not shards:
            raise FileNotFoundError(f"no image folder or tar shards match {data!r}")
        records = [r for shard in shards for r in tar_records(shard)]
    if not records:
        raise FileNotFoundError(f"no images (jpg/png/webp) found in {data!r}")
    return records


def read_image_bytes(record: Record) -> bytes:
    if not record.image:
        return Path(record.source).read_bytes()
    with tarfile.open(record.source) as tar:
        return tar.extractfile(record.image).read()  # type: ignore[union-attr]


class BatchStream:
    """Seeded, resumable batches of (pixels [B, 3, s, s], captions), skipping bad images.

    `cursor` counts samples drawn so far (over epochs); it is all a checkpoint needs.
    With several processes each takes every `world`-th sample of the same global order.
    """

    def __init__(self, records: list[Record], *, size: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, cursor: int = 0) -> None:
        self.records, self.size, self.batch_size = records, size, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.cursor, self.skipped = cursor, 0
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def _draw(self) -> Record:
        epoch, index = divmod(self.cursor, len(self.records))
        self.cursor += 1
        return self.records[self._order(epoch)[index]]

    def _load(self, record: Record) -> np.ndarray | None:
        try:
            data = read_image_bytes(record)
            pixels, _ = decode_for_model(data, self.size, max_bytes=MAX_IMAGE_BYTES,
                                         max_pixels=MAX_IMAGE_PIXELS)
            return pixels
        except (ImageError, OSError, KeyError, tarfile.TarError):
            self.skipped += 1
            return None

    def next_batch(self) -> tuple[torch.Tensor, list[str]]:
        arrays: list[np.ndarray] = []
        captions: list[str] = []
        attempts = 0
        while len(arrays) < self.batch_size:
            attempts += 1
            if attempts > 100 * self.batch_size * self.world and not arrays:
                raise RuntimeError("no readable image in the data: every image failed to decode")
            group = [self._draw() for _ in range(self.world)]  # one global step of samples
            record = group[self.rank]
            array = self._load(record)
            if array is not None:
                arrays.append(array)
                captions.append(record.caption)
        return to_pixels(arrays), captions
