"""The one preprocessing definition: decode -> RGB -> resize/crop -> ImageNet normalisation (+ train augmentation).

Ray Data's decode step, evaluation and the Serve predictor all call :class:`Preprocessing`, and checkpoints store
its :meth:`Preprocessing.to_dict`, so a model is always fed exactly as it was trained. Pure PIL + numpy.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from genderid import corruptions
from genderid.errors import UserError
from genderid.faces import FaceFrontEnd, FaceSettings, frame_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ImageInput = Union[bytes, bytearray, memoryview, Image.Image]


class ImageDecodeError(UserError, ValueError):
    """The bytes are empty, corrupt or not an image."""


class ImageTooLargeError(UserError, ValueError):
    """The image's dimensions exceed the pixel limit (a decompression bomb, or just far too big)."""


def shrink(img: Image.Image, size: Optional[tuple[int, int]]) -> Image.Image:
    """Reduce an image far larger than ``size`` (width, height) by a whole factor, keeping at least twice ``size``.

    Done before any mode conversion, so that conversion's temporaries are of the small image: a box filter where
    PIL has one for the mode, nearest neighbour (palette, 1-bit, 16-bit) elsewhere.
    """
    if size is None:
        return img
    factor = int(min(img.width / (2 * size[0]), img.height / (2 * size[1])))
    if factor < 2:
        return img
    if img.mode in ("P", "1", "I;16", "I;16B", "I;16L", "I;16N"):
        return img.resize((max(1, img.width // factor), max(1, img.height // factor)), Image.NEAREST)
    return img.reduce(factor)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: grayscale, CMYK, palette, RGBA/LA (on white), 16-bit and float images."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # PIL's convert("L") clips 16-bit values at 255; keep the high byte instead (2 bytes a pixel, no floats).
        img = Image.fromarray((np.asarray(img).astype(np.uint16, copy=False) >> 8).astype(np.uint8))
    elif img.mode in ("I", "F"):
        array = np.asarray(img, dtype=np.float32)
        peak = float(array.max()) if array.size else 0.0
        if img.mode == "I":
            high = 255.0 if peak <= 255 else (65535.0 if peak <= 65535 else peak)
        else:
            high = max(peak, 1.0)
        array *= 255.0 / high
        np.clip(array, 0, 255, out=array)
        img = Image.fromarray((array + 0.5).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(data: ImageInput, draft_size: Optional[tuple[int, int]] = None,
               max_pixels: Optional[int] = None, formats: Optional[Sequence[str]] = None) -> Image.Image:
    """Decode bytes (or take a PIL image), apply its EXIF orientation and return it as RGB.

    ``draft_size`` (width, height) is the size the caller needs: a JPEG decodes at a reduced scale, other images
    are reduced right after decoding, before any mode conversion. ``max_pixels`` is checked on the size that will
    be decoded (a JPEG's draft size), before any pixel is decoded; PIL's own decompression-bomb guard
    (``Image.MAX_IMAGE_PIXELS``) applies to the header as well. Both raise :class:`ImageTooLargeError`.
    ``formats`` limits which of PIL's decoders may look at the bytes (e.g. ``("JPEG", "PNG", "WEBP")``).
    """
    if isinstance(data, Image.Image):
        img = data
    else:
        if not data:
            raise ImageDecodeError("empty image")
        try:
            img = Image.open(io.BytesIO(bytes(data)), formats=formats)
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLargeError(f"image is {img.width}x{img.height} = {img.width * img.height:,} pixels; "
                                         f"the limit is {max_pixels:,}")
            img.load()
        except ImageTooLargeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(str(exc)) from None
        except Image.UnidentifiedImageError:
            raise ImageDecodeError("not a recognised image format (JPEG, PNG, WebP, ...)") from None
        except Exception as exc:  # PIL raises many types for corrupt input
            raise ImageDecodeError(f"cannot decode image: {exc}") from None
    img = shrink(img, draft_size)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not make a good image unusable
        pass
    return to_rgb(img)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model input; stored in every checkpoint."""

    image_size: tuple[int, int] = (218, 178)  # (height, width)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    flip_prob: float = 0.5  # train augmentation
    crop_scale: tuple[float, float] = (0.85, 1.0)  # train augmentation: area fraction of the random resized crop
    # train augmentation: brightness and contrast each scaled by a random factor in [1 - jitter, 1 + jitter]
    # (photos are darker, flatter and brighter than CelebA's; see genderid.robustness). 0 draws nothing.
    jitter: float = 0.0
    # train augmentation: the chance of random erasing (Zhong et al. 2020): one rectangle of 2-20% of the image,
    # filled with the mean colour, standing in for hats, glasses and hands over a face. 0 draws nothing.
    erase: float = 0.0
    # train augmentation: the chance of softening a train image, half the time by a Gaussian blur of 0.5-2.5% of its
    # shorter side, half the time by shrinking it 2-4x and back (blurry and low-resolution photos; the robustness
    # report's own corruptions). 0 draws nothing.
    blur: float = 0.0
    faces: FaceSettings = FaceSettings()  # how photos become aligned crops (POST /faces, prepare --align)

    @classmethod
    def for_data(cls, data) -> "Preprocessing":
        """The preprocessing of a run's ``data`` config (:class:`genderid.config.DataConfig`)."""
        return cls(image_size=tuple(data.image_size), jitter=data.jitter, erase=data.erase,
                   blur=data.blur)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        if not isinstance(values, dict):
            raise ValueError(f"preprocessing must be a mapping, got {values!r}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k != "faces"}
        # Checkpoints from before the face front end have no "faces": they get its defaults.
        return cls(**fields, faces=FaceSettings.from_dict(values.get("faces")))

    def face_front_end(self) -> FaceFrontEnd:
        """The detector and aligner for these settings, cropping to CelebA's frame at this input size."""
        return FaceFrontEnd(self.faces, frame_size(self.image_size))

    def validate(self) -> "Preprocessing":
        """Raise ValueError when a field is out of range (a checkpoint's stored preprocessing is untrusted)."""
        def numbers(name, values, count):
            if not isinstance(values, tuple) or len(values) != count or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
                raise ValueError(f"{name} must be {count} finite numbers, got {values!r}")

        numbers("image_size", self.image_size, 2)
        if not all(float(v).is_integer() and 16 <= v <= 4096 for v in self.image_size):
            raise ValueError(f"image_size must be two whole numbers in 16..4096, got {self.image_size!r}")
        numbers("mean", self.mean, 3)
        numbers("std", self.std, 3)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        numbers("crop_scale", self.crop_scale, 2)
        if not (isinstance(self.flip_prob, (int, float)) and 0 <= self.flip_prob <= 1):
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")
        if not (isinstance(self.jitter, (int, float)) and not isinstance(self.jitter, bool) and 0 <= self.jitter < 1):
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter!r}")
        if not (isinstance(self.erase, (int, float)) and not isinstance(self.erase, bool) and 0 <= self.erase <= 1):
            raise ValueError(f"erase must be in [0, 1], got {self.erase!r}")
        if not (isinstance(self.blur, (int, float)) and not isinstance(self.blur, bool) and 0 <= self.blur <= 1):
            raise ValueError(f"blur must be in [0, 1], got {self.blur!r}")
        self.faces.validate()
        return self

    def resize(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> Image.Image:
        """Scale to cover ``image_size`` and crop (centre, or a mild random resized crop when ``rng`` is given)."""
        height, width = self.image_size
        src_w, src_h = img.size
        target_aspect = width / height
        if rng is None:
            crop_w, crop_h = src_w, src_h
            if src_w / src_h > target_aspect:
                crop_w = src_h * target_aspect
            else:
                crop_h = src_w / target_aspect
            left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
        else:
            area = src_w * src_h * rng.uniform(*self.crop_scale)
            aspect = target_aspect * float(np.exp(rng.uniform(np.log(0.95), np.log(1.05))))
            crop_w = min(src_w, np.sqrt(area * aspect))
            crop_h = min(src_h, np.sqrt(area / aspect))
            left, top = rng.uniform(0, src_w - crop_w), rng.uniform(0, src_h - crop_h)
        box = (left, top, left + crop_w, top + crop_h)
        return img.resize((width, height), Image.BILINEAR, box=box, reducing_gap=3.0)

    def draft_size(self) -> tuple[int, int]:
        height, width = self.image_size
        return width, height

    def __call__(self, data: ImageInput, rng: Optional[np.random.Generator] = None,
                 max_pixels: Optional[int] = None, formats: Optional[Sequence[str]] = None) -> np.ndarray:
        """One image -> float32 CHW array, normalised. Passing ``rng`` turns on train augmentation."""
        img = self.resize(open_image(data, draft_size=self.draft_size(), max_pixels=max_pixels, formats=formats),
                          rng)
        if rng is not None and rng.random() < self.flip_prob:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if rng is not None and self.blur > 0 and rng.random() < self.blur:
            img = self._soften(img, rng)
        array = np.asarray(img, dtype=np.float32) / 255.0
        if rng is not None and self.jitter > 0:
            array = self._jitter(array, rng)
        if rng is not None and self.erase > 0 and rng.random() < self.erase:
            array = self._erase(array, rng)
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def _jitter(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Random brightness, then contrast about the image's mean grey, of an HWC array in [0, 1]."""
        brightness, contrast = rng.uniform(1 - self.jitter, 1 + self.jitter, size=2)
        array = array * np.float32(brightness)
        grey = np.float32(array.mean())
        array = (array - grey) * np.float32(contrast) + grey
        return np.clip(array, 0.0, 1.0, out=array)

    @staticmethod
    def _soften(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A blurred or a low-resolution version of ``img``, at its size (one of the two, equally likely)."""
        if rng.random() < 0.5:
            return corruptions.gaussian_blur(img, rng.uniform(0.5, 2.5), rng)
        return corruptions.downscale(img, rng.uniform(2.0, 4.0), rng)

    def _erase(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One rectangle of an HWC array in [0, 1] set to the mean colour (zero once normalised), in place."""
        height, width = array.shape[:2]
        area = height * width * rng.uniform(0.02, 0.2)
        aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3))))
        box_h = min(height, max(1, int(round(np.sqrt(area * aspect)))))
        box_w = min(width, max(1, int(round(np.sqrt(area / aspect)))))
        top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
        array[top:top + box_h, left:left + box_w] = np.asarray(self.mean, np.float32)
        return array

    def batch(self, images: Iterable[ImageInput], rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Many images -> float32 NCHW array."""
        arrays = [self(image, rng) for image in images]
        if not arrays:
            height, width = self.image_size
            return np.zeros((0, 3, height, width), np.float32)
        return np.stack(arrays)
