"""Decoding uploads with bounded memory: the header first (cheap, checked), then the
pixels, under a per-process budget of pixels being decoded at once.

Where the workers decode (job format v4, `decode_at`), the API reads the header only:
the limits are checked on it, and the upload travels as sent (docs/scale.md).

The model needs at most s x s pixels, so JPEGs are decoded at a reduced scale (see
cleandift.images); other formats decode whole, which the budget keeps in check: a burst
of large PNGs waits for room instead of holding gigabytes at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from cleandift.images import ImageError, ImageSource, pixels_digest, resize_rgb, upload_digest
from cleandift.settings import Settings

from .problems import Problem

# Pillow keeps even RGB at 4 bytes per pixel, and a conversion to RGB (CMYK, palette,
# alpha) holds a second image for a moment.
BYTES_PER_PIXEL = 8


class MemoryBudget:
    """A weighted semaphore over bytes; one image larger than the budget runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._room = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        need = min(nbytes, self.limit)
        async with self._room:
            await self._room.wait_for(lambda: self.used + need <= self.limit)
            self.used += need
        try:
            yield
        finally:
            async with self._room:
                self.used -= need
                self._room.notify_all()


@dataclass(frozen=True)
class Upload:
    pixels: np.ndarray | None  # s x s x 3 uint8: what the model sees (decoded here)
    data: bytes | None  # the upload as sent, for a worker to decode (not decoded here)
    size: tuple[int, int]  # the image's displayed (width, height): the frame of points
    content: str  # a hash of `pixels` (or of `data`): the feature cache's key and the ETag


async def take_upload(name: str, data: bytes, size: int, settings: Settings,
                      budget: MemoryBudget, *, decode: bool) -> Upload:
    """An upload checked on its header; decoded to the model's view when `decode`."""
    try:
        source = await run_in_threadpool(ImageSource, data, max_bytes=settings.max_body_bytes,
                                         max_pixels=settings.max_image_pixels)
        if not decode:
            return Upload(None, data, source.size, upload_digest(data))
        async with budget.hold(BYTES_PER_PIXEL * source.cost(size)):
            pixels, content = await run_in_threadpool(_model_view, source, size)
    except ImageError as exc:
        raise Problem(exc.status, f"{name}: {exc}") from exc
    return Upload(pixels, None, source.size, content)


def _model_view(source: ImageSource, size: int) -> tuple[np.ndarray, str]:
    pixels = resize_rgb(source.decode(size), size)
    return pixels, pixels_digest(pixels)
