"""Image decoding shared by the CLI, the service and the trainer.

Every failure is a typed `ImageError` so callers can map it to a status code; sizes are
checked from the header before any pixel is decoded (decompression bombs never expand).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")


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


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes of any supported format -> an RGB image with EXIF orientation applied."""
    if not data:
        raise EmptyImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image has {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the one that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UndecodableImageError(
            f"not a decodable image (supported: {', '.join(SUPPORTED_FORMATS[:6])})"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UndecodableImageError(f"not a decodable image: {exc}") from exc
    if image.format not in SUPPORTED_FORMATS:
        raise UndecodableImageError(f"unsupported image format {image.format}")
    width, height = image.size
    if width < 1 or height < 1:
        raise UndecodableImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image has {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels}"
        )
    try:
        image.seek(0)  # first frame of animations
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UndecodableImageError(f"the image data is corrupt or truncated: {exc}") from exc


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


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """The model's view of an image: s x s (no crop, aspect not kept), uint8 HWC."""
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def to_pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays (same size) -> float tensor NCHW in [-1, 1]."""
    import torch  # here, so that decoding (the API's part) needs no torch

    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float().div_(127.5).sub_(1.0)
