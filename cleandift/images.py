"""Image decoding shared by the CLI, the service and the trainer.

Every failure is a typed `ImageError` so callers can map it to a status code. Decoding is
two steps, so memory is known before it is spent: `ImageSource` reads only the header
(allowed formats only, size limits checked: decompression bombs never expand), then
`decode` expands the pixels. For the model, which needs at most s x s pixels, a large
JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (`reduce_to`): a 7000 x 7000
photo costs 2.3 MB instead of 147 MB.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")
_PARSERS = SUPPORTED_FORMATS[:-1]  # MPO files are opened by the JPEG parser
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_ORIENTATION_TAG = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageError(ValueError):
    """Base of all image failures; `status` is the HTTP status the API answers with."""

    status = 400


class EmptyImageError(ImageError):
    pass


class UndecodableImageError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    """Too many bytes or too many pixels."""

    status = 413


class ImageSource:
    """An image whose header was read and checked; its pixels are not decoded yet."""

    def __init__(self, data: bytes, *, max_bytes: int, max_pixels: int) -> None:
        if not data:
            raise EmptyImageError("the image is empty (0 bytes)")
        if len(data) > max_bytes:
            raise ImageTooLargeError(f"the image has {len(data)} bytes; the limit is {max_bytes}")
        self._image: ImageFile.ImageFile = _open(data)
        self._stored = width, height = self._image.size  # before any reduced decoding
        if width < 1 or height < 1:
            raise UndecodableImageError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLargeError(f"the image has {width}x{height} = {width * height} "
                                     f"pixels; the limit is {max_pixels}")
        self.format = str(self._image.format)
        self._swapped = _header_orientation(self._image) in _SWAPS_AXES

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed (EXIF orientation applied): the frame of points.
        Final once decoded (a PNG may carry its EXIF after the pixels)."""
        width, height = self._stored
        return (height, width) if self._swapped else (width, height)

    def scale(self, reduce_to: int | None) -> int:
        """The JPEG decoding scale (1, 2, 4 or 8) that keeps both sides >= reduce_to."""
        if reduce_to is None or self.format not in ("JPEG", "MPO") or len(self._image.tile) != 1:
            return 1
        ratio = min(self._stored) // reduce_to
        return next((s for s in (8, 4, 2) if ratio >= s), 1)

    def cost(self, reduce_to: int | None = None) -> int:
        """Pixels the decode will hold in memory."""
        width, height = self._stored
        s = self.scale(reduce_to)
        return -(-width // s) * -(-height // s)

    def decode(self, reduce_to: int | None = None) -> Image.Image:
        """RGB pixels with EXIF orientation applied; at least `reduce_to` on each side."""
        image = self._image
        try:
            if self.scale(reduce_to) > 1:
                image.draft(None, (reduce_to, reduce_to))  # type: ignore[arg-type]
            image.seek(0)  # first frame of animations
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
            self._swapped = _orientation(image) in _SWAPS_AXES  # EXIF after the pixels too
            ImageOps.exif_transpose(image, in_place=True)  # (otherwise a copy, even if upright)
            return to_rgb(image)
        except _DECODE_ERRORS as exc:
            raise UndecodableImageError(f"the image data is corrupt or truncated: {exc}") from exc


def _open(data: bytes) -> ImageFile.ImageFile:
    """Read the header with the allowed formats' parsers only."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()  # registers the parsers named below (once; cheap afterwards)
            return Image.open(io.BytesIO(data), formats=_PARSERS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UndecodableImageError(
            f"not a decodable image (supported: {', '.join(SUPPORTED_FORMATS[:6])})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UndecodableImageError(f"not a decodable image: {exc}") from exc


def _header_orientation(image: ImageFile.ImageFile) -> int:
    """EXIF orientation from what the header parsing read, without decoding any pixel
    (Pillow's PNG `getexif` would decode the whole image to look further)."""
    try:
        if image.format == "TIFF":
            return int(image.tag_v2.get(_ORIENTATION_TAG, 1))  # type: ignore[attr-defined]
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(_ORIENTATION_TAG, 1))
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return 1


def _orientation(image: Image.Image) -> int:
    """EXIF orientation of a decoded image."""
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except _DECODE_ERRORS:
        return 1


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes of any supported format -> an RGB image with EXIF orientation applied."""
    return ImageSource(data, max_bytes=max_bytes, max_pixels=max_pixels).decode()


def decode_for_model(data: bytes, size: int, *, max_bytes: int, max_pixels: int,
                     resample: str = "bicubic") -> tuple[np.ndarray, tuple[int, int]]:
    """(the model's s x s uint8 view of the image, its displayed (width, height))."""
    source = ImageSource(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return resize_rgb(source.decode(reduce_to=size), size, resample), source.size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha is composited over white, 16-bit data is rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_rgb(image: Image.Image, size: int, resample: str = "bicubic") -> np.ndarray:
    """The model's view of an image: s x s (no crop, aspect not kept), uint8 HWC."""
    if image.size != (size, size):  # (PIL would copy an image already that size)
        image = image.resize((size, size), RESAMPLE[resample])
    return np.asarray(image, dtype=np.uint8)


def to_pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays (same size) -> float tensor NCHW in [-1, 1]."""
    import torch  # here, so that decoding (the API's part) needs no torch

    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float().div_(127.5).sub_(1.0)


def pixels_digest(pixels: np.ndarray) -> str:
    """Content hash of an image's model-sized pixels (C-contiguous uint8): the feature
    cache's key and the source of its DIFT noise seed, wherever the features are made."""
    return hashlib.sha256(np.ascontiguousarray(pixels).data).hexdigest()[:32]


def upload_digest(data: bytes) -> str:
    """Content hash of an upload as sent: the ETag's part of a job a worker decodes (the
    same bytes make the same pixels; `u` keeps it apart from `pixels_digest`)."""
    return "u" + hashlib.sha256(data).hexdigest()[:31]


def noise_seed(digest: str) -> int:
    """DIFT mode's noise seed of an image, from `pixels_digest`: the same noise for the same
    image in the service, its cache and `extract-dataset`."""
    return int(digest[:15], 16)

