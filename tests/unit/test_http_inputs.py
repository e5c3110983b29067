"""What the endpoint accepts, without Serve: content types, body and pixel limits, odd but valid images."""
import io

import numpy as np
import pytest
from PIL import Image

from genderid.http_inputs import Limits, RequestError, check_image_type, decode_upload, media_type
from genderid.preprocess import Preprocessing

PRE = Preprocessing(image_size=(32, 32))
LIMITS = Limits(max_body_bytes=1000, max_pixels=10_000, max_files=4)


def encode(img, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def status_of(call, *args):
    with pytest.raises(RequestError) as info:
        call(*args)
    return info.value.status


def test_media_types():
    assert media_type("Image/JPEG; charset=binary") == "image/jpeg" and media_type(None) == ""
    for ok in ("image/jpeg", "image/png", "image/webp", "application/octet-stream"):
        check_image_type(ok)
    for bad in ("text/plain", "application/json", "application/x-www-form-urlencoded", None, ""):
        assert status_of(check_image_type, bad) == 415


def test_body_limits_refuse_by_header_and_while_reading():
    LIMITS.check_declared_length("1000")
    LIMITS.check_declared_length(None)
    assert status_of(LIMITS.check_declared_length, "1001") == 413
    assert status_of(LIMITS.check_declared_length, "ten") == 400
    LIMITS.check_read_length(1000)
    assert status_of(LIMITS.check_read_length, 1001) == 413
    with pytest.raises(ValueError, match="max_pixels"):
        Limits(max_pixels=0)


@pytest.mark.parametrize("data,status", [
    (b"", 400),
    (bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)), 400),
    (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], 400),  # truncated
    (encode(Image.new("L", (200, 200))), 413),  # 40,000 pixels > 10,000
])
def test_bad_uploads_get_their_status(data, status):
    assert status_of(decode_upload, data, PRE, LIMITS) == status


def test_pil_decompression_bomb_guard_is_a_413(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses above 2x this, before our own limit
    assert status_of(decode_upload, encode(Image.new("L", (50, 50))), PRE, Limits(max_pixels=10**9)) == 413


def test_large_jpeg_is_decoded_in_draft_mode():
    big = encode(Image.new("RGB", (3000, 2000), (200, 30, 30)), "JPEG")
    array = decode_upload(big, PRE, Limits(max_pixels=10**7))
    assert array.shape == (3, 32, 32) and array[0].mean() > array[1].mean()


def rgb16():
    return Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))


@pytest.mark.parametrize("img,fmt", [
    (Image.new("L", (20, 30), 128), "PNG"), (Image.new("CMYK", (20, 30), (0, 255, 255, 0)), "JPEG"),
    (Image.new("RGB", (20, 30), "red").convert("P"), "PNG"), (Image.new("RGBA", (20, 30), (0, 0, 255, 100)), "PNG"),
    (rgb16(), "PNG"), (Image.new("RGB", (20, 30), "green"), "WEBP"),
])
def test_odd_but_valid_images_are_served(img, fmt):
    array = decode_upload(encode(img, fmt), PRE, LIMITS)
    assert array.shape == (3, 32, 32) and np.isfinite(array).all()


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 80), "white")
    img.paste(Image.new("RGB", (40, 40), "black"), (0, 0))  # top half black as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the black half moves to the right
    array = decode_upload(encode(img, "JPEG", exif=exif.tobytes()), Preprocessing(image_size=(40, 80)), LIMITS)
    assert array[:, :, 40:].mean() < array[:, :, :40].mean()


@pytest.mark.parametrize("img,fmt", [
    (Image.new("RGB", (20, 30), "blue"), "GIF"), (Image.new("F", (20, 30), 0.5), "TIFF"),
    (Image.new("RGB", (20, 30)), "BMP"), (Image.new("RGB", (20, 30)), "ICO"),
])
def test_only_jpeg_png_and_webp_reach_a_decoder_other_images_are_415(img, fmt, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(k.get("formats")) or real_open(*a, **k))
    assert status_of(decode_upload, encode(img, fmt), PRE, LIMITS) == 415
    assert opened == []  # refused from the magic bytes: PIL's decoders never saw them
    decode_upload(encode(Image.new("RGB", (20, 30)), "PNG"), PRE, LIMITS)
    assert opened == [("PNG",)]  # and an accepted image is opened by its own decoder only


def test_the_default_pixel_limit_refuses_the_16_bit_6300x6300_png_from_its_header_at_once(monkeypatch):
    from PIL import ImageFile

    from genderid.http_inputs import Limits as Defaults

    data = encode(Image.new("I;16", (6300, 6300)), "PNG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    assert status_of(decode_upload, data, PRE, Defaults()) == 413  # the header was enough: nothing was decoded


def test_a_large_png_is_reduced_before_its_mode_is_converted(monkeypatch):
    from genderid import preprocess

    converted = []
    real_to_rgb = preprocess.to_rgb
    monkeypatch.setattr(preprocess, "to_rgb", lambda img: converted.append((img.mode, img.size)) or real_to_rgb(img))
    img = preprocess.open_image(encode(Image.new("I;16", (2000, 1600), 30000), "PNG"), draft_size=(32, 32))
    assert converted == [("I;16", (80, 64))]  # the mode conversion saw the reduced 16-bit image
    assert img.mode == "RGB" and img.size == (2000 // 25, 1600 // 25)  # reduced by 25 before conversion
    assert img.getpixel((0, 0)) == (117, 117, 117)  # 30000 >> 8: the 16-bit range kept, not clipped at 255
