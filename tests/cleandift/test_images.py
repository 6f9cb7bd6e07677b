import numpy as np
import pytest
from PIL import Image

from cleandift.images import (
    EmptyImageError,
    ImageError,
    ImageSource,
    ImageTooLargeError,
    UndecodableImageError,
    decode_for_model,
    decode_image,
    resize_rgb,
    to_pixels,
)
from tests.corpus import (
    bad_images,
    encode,
    good_images,
    png_bomb,
    rotated_jpeg,
    sixteen_bit_png,
    textured_image,
)

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


def test_large_jpegs_decode_at_a_reduced_scale_for_the_model():
    big = textured_image(300, 200, seed=3).resize((3000, 2000))
    data = encode(big, "JPEG", quality=90)
    source = ImageSource(data, max_bytes=1 << 24, max_pixels=10**8)
    assert source.size == (3000, 2000)
    assert source.scale(256) == 4 and source.cost(256) == 750 * 500  # not 6 megapixels
    assert source.scale(None) == 1 and source.cost() == 3000 * 2000
    pixels, size = decode_for_model(data, 256, max_bytes=1 << 24, max_pixels=10**8)
    full = resize_rgb(decode_image(data, max_bytes=1 << 24, max_pixels=10**8), 256)
    assert size == (3000, 2000) and pixels.shape == (256, 256, 3)
    # libjpeg's DCT scaling then bicubic, against bicubic from the full decode: same picture
    assert np.abs(pixels.astype(int) - full.astype(int)).mean() < 2.0


def test_reduced_decoding_keeps_exif_orientation():
    image = textured_image(120, 80, seed=5).resize((1200, 800))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif.tobytes())
    pixels, size = decode_for_model(data, 64, max_bytes=1 << 24, max_pixels=10**8)
    assert size == (800, 1200)  # displayed portrait
    full = resize_rgb(decode_image(data, max_bytes=1 << 24, max_pixels=10**8), 64)
    assert np.abs(pixels.astype(int) - full.astype(int)).mean() < 3.0


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM"])
def test_formats_outside_the_allow_list_are_not_parsed(fmt):
    data = encode(textured_image(32, 32, seed=6), fmt)
    with pytest.raises(UndecodableImageError, match="not a decodable image"):
        ImageSource(data, max_bytes=1 << 20, max_pixels=10**6)
