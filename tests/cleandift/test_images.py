import numpy as np
import pytest
from PIL import Image

from cleandift.images import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    UndecodableImageError,
    decode_image,
    resize_rgb,
    to_pixels,
)
from tests.corpus import bad_images, good_images, png_bomb, rotated_jpeg, sixteen_bit_png

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 4_000_000}


@pytest.mark.parametrize("name", sorted(good_images()))
def test_every_supported_input_decodes_to_rgb(name):
    image = decode_image(good_images()[name], **LIMITS)
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


def test_exif_orientation_is_applied():
    data, (width, height) = rotated_jpeg()
    assert decode_image(data, **LIMITS).size == (width, height)


def test_sixteen_bit_keeps_its_range():
    array = np.asarray(decode_image(sixteen_bit_png(), **LIMITS))
    assert array.min() == 0 and array.max() == 255


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    import io

    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert np.asarray(decode_image(buf.getvalue(), **LIMITS)).min() == 255


EXPECTED = {
    "empty": EmptyImageError,
    "text": UndecodableImageError,
    "html": UndecodableImageError,
    "truncated_jpeg": UndecodableImageError,
    "truncated_png": UndecodableImageError,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_inputs_get_typed_errors(name):
    with pytest.raises(EXPECTED[name]) as err:
        decode_image(bad_images()[name], **LIMITS)
    assert err.value.status == 400


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageTooLargeError) as err:
        decode_image(png_bomb(), **LIMITS)
    assert err.value.status == 413
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(png_bomb(3000, 2000), **LIMITS)


def test_byte_limit():
    data = good_images()["png"]
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10**9)
    assert isinstance(ImageTooLargeError("x"), ImageError)


def test_pixels_are_resized_and_scaled(photo):
    array = resize_rgb(photo, 64)
    assert array.shape == (64, 64, 3) and array.dtype == np.uint8
    pixels = to_pixels([array, array])
    assert pixels.shape == (2, 3, 64, 64)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
