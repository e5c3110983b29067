"""Photos with known faces: real aligned face crops scaled, tilted and placed in larger synthetic scenes.

What the face front end's tests and ``benchmarks/faces_accuracy.py`` measure detection and accuracy on: each photo
comes with the true box of every face it holds (where dlib's box would be on the face's own crop,
:data:`genderid.faces.CELEBA_TEMPLATE_BOX`, carried through the same scale, tilt and placement). Pure PIL + numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from genderid.faces import CELEBA_TEMPLATE_BOX, TEMPLATE_FRAME


@dataclass
class Scene:
    """A photo and, per face placed in it, its true box (x0, y0, x1, y1) and label (1 male, 0 female)."""

    photo: Image.Image
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A face-free scene: a colour gradient with random rectangles, ellipses and lines, and sensor noise."""
    width, height = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    img = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 12)))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _feathered_oval(size: tuple[int, int]) -> Image.Image:
    """An alpha mask: an oval filling ``size`` with a soft edge, so a pasted crop has no hard rectangle around it."""
    width, height = size
    mask = Image.new("L", size, 0)
    inset = max(2, min(width, height) // 12)
    ImageDraw.Draw(mask).ellipse((inset, inset, width - inset, height - inset), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(inset / 2))


def place_face(photo: Image.Image, crop: Image.Image, face_width: float, angle: float,
               centre: tuple[float, float]) -> tuple[float, float, float, float]:
    """Paste an aligned face ``crop`` into ``photo`` so its face box is ``face_width`` px wide, tilted by ``angle``
    degrees (counter-clockwise) and centred at ``centre``; returns the face's true box in ``photo``."""
    frame_scale = crop.width / TEMPLATE_FRAME[0]
    bx0, by0, bx1, by1 = (v * frame_scale for v in CELEBA_TEMPLATE_BOX)
    scale = face_width / (bx1 - bx0)
    scaled = crop.convert("RGB").resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                                        Image.Resampling.LANCZOS)
    mask = _feathered_oval(scaled.size)
    rotated = scaled.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    rotated_mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    # Where the face box's centre lands in the rotated crop (PIL rotates about the centre, counter-clockwise).
    box_centre = np.array([(bx0 + bx1) / 2, (by0 + by1) / 2]) * scale - np.array(scaled.size) / 2
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    moved = rotation @ box_centre + np.array(rotated.size) / 2
    offset = (round(centre[0] - moved[0]), round(centre[1] - moved[1]))
    photo.paste(rotated, offset, rotated_mask)
    half_w, half_h = (bx1 - bx0) * scale / 2, (by1 - by0) * scale / 2
    cx, cy = moved[0] + offset[0], moved[1] + offset[1]
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def compose(rng: np.random.Generator, crops: Sequence[Image.Image], labels: Sequence[int],
            size: tuple[int, int] = (640, 480), face_width: tuple[float, float] = (70, 150),
            max_angle: float = 10.0) -> Scene:
    """A scene of ``size`` holding each crop once, without overlaps (fewer if they cannot all fit)."""
    scene = Scene(background(rng, size))
    for crop, label in zip(crops, labels):
        width = float(rng.uniform(*face_width))
        margin = width * 1.4  # the crop reaches well beyond the face box (hair, shoulders)
        for _ in range(50):
            centre = (float(rng.uniform(margin / 2, size[0] - margin / 2)),
                      float(rng.uniform(margin / 2, size[1] - margin / 2)))
            if all(abs(centre[0] - (b[0] + b[2]) / 2) > margin or abs(centre[1] - (b[1] + b[3]) / 2) > margin
                   for b in scene.boxes):
                break
        else:
            continue
        scene.boxes.append(place_face(scene.photo, crop, width, float(rng.uniform(-max_angle, max_angle)), centre))
        scene.labels.append(int(label))
    return scene


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(true_boxes: Sequence[Sequence[float]], found_boxes: Sequence[Sequence[float]],
          threshold: float = 0.3) -> list[tuple[int, int]]:
    """Greedy one-to-one matching by IoU >= ``threshold``: pairs (true index, found index), best IoU first."""
    pairs = sorted(((iou(t, f), i, j) for i, t in enumerate(true_boxes) for j, f in enumerate(found_boxes)),
                   reverse=True)
    used_true, used_found, matched = set(), set(), []
    for value, i, j in pairs:
        if value >= threshold and i not in used_true and j not in used_found:
            used_true.add(i)
            used_found.add(j)
            matched.append((i, j))
    return matched
