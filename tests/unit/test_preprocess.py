import io

import numpy as np
import pytest
from PIL import Image

from genderid.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError, Preprocessing, open_image

PRE = Preprocessing(image_size=(40, 30))


def encode(img, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def white(value):
    """What a pure-white pixel becomes after normalisation, per channel."""
    return (value - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


def palette_image():
    img = Image.new("P", (50, 60))
    img.putpalette([255, 255, 255] * 256)
    return img


def sixteen_bit_image():
    return Image.fromarray(np.full((60, 50), 65535, dtype=np.uint16))


@pytest.mark.parametrize("make, fmt", [
    (lambda: Image.new("RGB", (50, 60), "white"), "JPEG"),
    (lambda: Image.new("L", (50, 60), 255), "PNG"),
    (lambda: Image.new("CMYK", (50, 60), (0, 0, 0, 0)), "JPEG"),
    (palette_image, "PNG"),
    (lambda: Image.new("RGBA", (50, 60), (0, 0, 0, 0)), "PNG"),  # fully transparent -> white background
    (lambda: Image.new("LA", (50, 60), (0, 0)), "PNG"),
    (sixteen_bit_image, "PNG"),
    (lambda: Image.new("RGB", (50, 60), "white"), "TIFF"),
])
def test_every_mode_becomes_normalised_rgb(make, fmt):
    array = PRE(encode(make(), fmt))
    assert array.shape == (3, 40, 30) and array.dtype == np.float32
    # All these images are white: every pixel must land on normalised white (JPEG: within rounding).
    assert np.allclose(array.mean(axis=(1, 2)), white(1.0), atol=0.05)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 50 * 60).reshape(60, 50).astype(np.uint16)
    img = open_image(encode(Image.fromarray(ramp)))
    pixels = np.asarray(img)[..., 0]
    assert img.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255
    assert 100 < np.median(pixels) < 155  # mid-grey stays mid-grey (clipping would make most of it 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 30), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert open_image(encode(img, "JPEG", exif=exif.tobytes())).size == (30, 60)


def test_pil_images_are_accepted():
    img = Image.new("RGB", (50, 60), "white")
    assert np.array_equal(PRE(img), PRE(img.copy()))


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(Image.new("RGB", (64, 64)), "JPEG")[:200]])
def test_bad_bytes_raise_decode_error(data):
    with pytest.raises(ImageDecodeError):
        PRE(data)


def test_resize_keeps_aspect_by_centre_crop():
    img = Image.new("RGB", (100, 40), "black")
    img.paste(Image.new("RGB", (30, 40), "white"), (35, 0))  # a white band in the middle third
    array = Preprocessing(image_size=(40, 30))(img)
    assert np.allclose(array.mean(axis=(1, 2)), white(1.0), atol=0.1)


def test_augmentation_is_random_but_shape_preserving_and_eval_is_deterministic():
    img = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8)))
    rng = np.random.default_rng(0)
    augmented = [PRE(img, rng) for _ in range(4)]
    assert all(a.shape == (3, 40, 30) for a in augmented)
    assert any(not np.allclose(augmented[0], a) for a in augmented[1:])
    assert np.array_equal(PRE(img), PRE(img))


def test_batch_and_round_trip_of_the_definition():
    batch = PRE.batch([Image.new("RGB", (50, 60))] * 3)
    assert batch.shape == (3, 3, 40, 30)
    assert PRE.batch([]).shape == (0, 3, 40, 30)
    assert Preprocessing.from_dict(PRE.to_dict()) == PRE
