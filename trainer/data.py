"""Training images: an image folder with caption sidecars, a list file, or img2dataset tar
shards (`cleandift.datasets.sources`).

All become an indexed list of records, so the order is a seeded permutation per epoch
and a resumed run continues from the exact sample it stopped at. Corrupt images are
skipped and counted, never fatal.
"""

from __future__ import annotations

import tarfile

import numpy as np
import torch

from cleandift.datasets.sources import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, Record, read_image_bytes
from cleandift.images import ImageError, decode_for_model, to_pixels


class BatchStream:
    """Seeded, resumable batches of (pixels [B, 3, s, s], captions), skipping bad images.

    `cursor` counts samples drawn so far (over epochs); it is all a checkpoint needs.
    With several processes each takes every `world`-th sample of the same global order.
    """

    def __init__(self, records: list[Record], *, size: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, cursor: int = 0,
                 resample: str = "bicubic") -> None:
        self.records, self.size, self.batch_size = records, size, batch_size
        self.resample = resample
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
                                         max_pixels=MAX_IMAGE_PIXELS, resample=self.resample)
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
