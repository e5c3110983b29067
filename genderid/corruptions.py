"""Common photo corruptions at a few severities, for the robustness report. Pure PIL + numpy.

Each corruption takes an RGB image as a user would send it (before the model's preprocessing) and a severity
from 0 to :data:`MAX_SEVERITY`; severity 0 returns the image unchanged. Size and mode are kept, so the model's own
preprocessing (resize, crop, normalise) runs after it as it would on any photo. Random corruptions (noise, the
direction of a rotation or a shift) draw from a generator seeded by the image's id, the corruption and the
severity: a report is the same on every run.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

MAX_SEVERITY = 3


def gaussian_blur(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """A Gaussian blur of radius ``level`` % of the shorter side (train augmentation softens images with it too)."""
    return img.filter(ImageFilter.GaussianBlur(radius=level * min(img.size) / 100.0))


def _jpeg(img: Image.Image, quality: float, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _brightness(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def _contrast(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(factor)


def _noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    array = np.asarray(img, dtype=np.int16)  # small temporaries: int16, not float64
    noisy = array + np.round(rng.normal(0.0, sigma, size=array.shape)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _rotate(img: Image.Image, degrees: float, rng: np.random.Generator) -> Image.Image:
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return img.rotate(sign * degrees, resample=Image.BILINEAR, fillcolor=(0, 0, 0))


def _shift(img: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(0.0, 2.0 * np.pi)
    dx, dy = (round(fraction * img.width * np.cos(angle)), round(fraction * img.height * np.sin(angle)))
    return img.transform(img.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.NEAREST,
                         fillcolor=(0, 0, 0))


def downscale(img: Image.Image, factor: float, rng: np.random.Generator) -> Image.Image:
    """``img`` shrunk ``factor`` times and scaled back up: a low-resolution face at the same size."""
    small = img.resize((max(1, round(img.width / factor)), max(1, round(img.height / factor))), Image.BOX)
    return small.resize(img.size, Image.BILINEAR)


def _grayscale(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    gray = img.convert("L").convert("RGB")
    return Image.blend(img, gray, float(level))


@dataclass(frozen=True)
class Corruption:
    """One corruption: ``levels[s - 1]`` is its parameter at severity ``s`` (1..MAX_SEVERITY)."""

    name: str
    parameter: str  # what the levels measure, for the report
    levels: tuple[float, ...]
    apply: Callable[[Image.Image, float, np.random.Generator], Image.Image]


CORRUPTIONS = (
    Corruption("gaussian_blur", "radius, % of the shorter side", (0.5, 1.0, 2.0), gaussian_blur),
    Corruption("jpeg", "JPEG quality", (30, 15, 7), _jpeg),
    Corruption("brightness", "brightness factor", (0.6, 0.4, 0.25), _brightness),
    Corruption("contrast", "contrast factor", (0.6, 0.4, 0.25), _contrast),
    Corruption("gaussian_noise", "noise sigma, of 255", (8, 16, 32), _noise),
    Corruption("rotation", "degrees, either way", (5, 10, 20), _rotate),
    Corruption("shift", "fraction of the size, any direction", (0.03, 0.06, 0.12), _shift),
    Corruption("downscale", "downscale factor (then back up)", (2, 3, 4), downscale),
    Corruption("grayscale", "share of grey", (0.33, 0.67, 1.0), _grayscale),
)
BY_NAME = {c.name: c for c in CORRUPTIONS}


def seed_for(image_id: str, name: str, severity: int) -> int:
    """A stable seed for one image under one corruption and severity (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{image_id}|{name}|{severity}".encode()).digest()[:8], "little")


def corrupt(img: Image.Image, name: str, severity: int, image_id: str = "") -> Image.Image:
    """``img`` (RGB) under corruption ``name`` at ``severity`` (0 = ``img`` itself), same size and mode."""
    if name not in BY_NAME:
        raise ValueError(f"unknown corruption {name!r} ({', '.join(BY_NAME)})")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be 0-{MAX_SEVERITY}, got {severity}")
    if severity == 0:
        return img
    corruption = BY_NAME[name]
    rng = np.random.default_rng(seed_for(image_id, name, severity))
    out = corruption.apply(img.convert("RGB"), corruption.levels[severity - 1], rng)
    return out if out.mode == "RGB" else out.convert("RGB")
