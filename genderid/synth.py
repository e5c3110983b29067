"""A synthetic data set in the complete official CelebA layout, for tests and the offline demo.

Each image is a drawn "face" whose ``Male`` label is carried by several cues at once, none of them perfect:
face shape (wider for male), hair length (long for 92% of female images, short for 92% of male ones), a beard
on 60% of the male images and lipstick on 60% of the female ones. Position, scale, skin, hair and background
colours and pixel noise vary per image, so a model must learn the cues rather than a pixel. A few other
attributes (eyeglasses, smiling, hair colour, hat, bangs ...) vary too, so per-attribute slices are not empty.

Deterministic: image ``i`` depends only on ``(seed, i)``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from genderid.celeba import ATTR_FILE, ATTRIBUTES, IDENTITY_FILE, IMAGE_DIR, PARTITION_FILE

from genderid.errors import UserError

HAIR_COLOURS = {"Black_Hair": (25, 20, 18), "Brown_Hair": (95, 60, 35), "Blond_Hair": (215, 185, 110),
                "Gray_Hair": (150, 150, 150)}
SKIN_TONES = [(241, 208, 180), (224, 172, 130), (190, 135, 95), (140, 95, 65), (95, 62, 45)]
PHOTOS_PER_PERSON = 2


def _attributes(rng: np.random.Generator, male: bool) -> dict[str, int]:
    a = {name: 0 for name in ATTRIBUTES}
    a["Male"] = int(male)
    a["Young"] = int(rng.random() < 0.75)
    a["Smiling"] = int(rng.random() < 0.5)
    a["Mouth_Slightly_Open"] = int(a["Smiling"] and rng.random() < 0.5)
    a["Eyeglasses"] = int(rng.random() < 0.15)
    a["Wearing_Hat"] = int(rng.random() < 0.06)
    a["Pale_Skin"] = int(rng.random() < 0.1)
    a[str(rng.choice(list(HAIR_COLOURS)))] = 1
    if male:
        a["Bald"] = int(rng.random() < 0.05)
        beard = rng.random() < 0.6
        a["No_Beard"] = int(not beard)
        a["Goatee"] = int(beard and rng.random() < 0.3)
        a["Mustache"] = int(beard and rng.random() < 0.5)
        a["5_o_Clock_Shadow"] = int(not beard and rng.random() < 0.3)
    else:
        a["No_Beard"] = 1
        a["Wearing_Lipstick"] = int(rng.random() < 0.6)
        a["Heavy_Makeup"] = int(a["Wearing_Lipstick"] and rng.random() < 0.6)
        a["Wearing_Earrings"] = int(rng.random() < 0.25)
    a["Bangs"] = int(rng.random() < 0.15)
    a["Attractive"] = int(rng.random() < 0.5)
    return a


def draw_face(rng: np.random.Generator, attrs: dict[str, int], size: tuple[int, int]) -> Image.Image:
    """Draw one face for ``attrs`` on a ``size`` = (width, height) canvas."""
    width, height = size
    male = bool(attrs["Male"])
    background = tuple(int(c) for c in rng.integers(40, 220, 3))
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    s = min(width, height)
    cx = width * (0.5 + rng.uniform(-0.08, 0.08))
    cy = height * (0.5 + rng.uniform(-0.06, 0.06))
    rx = s * 0.24 * rng.uniform(0.85, 1.15)
    ry = rx * (rng.uniform(1.0, 1.2) if male else rng.uniform(1.4, 1.6))
    skin = SKIN_TONES[0] if attrs["Pale_Skin"] else SKIN_TONES[int(rng.integers(len(SKIN_TONES)))]
    skin = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in skin)
    hair = next(HAIR_COLOURS[k] for k in HAIR_COLOURS if attrs[k])
    hair = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in hair)
    long_hair = (rng.random() < 0.92) != male
    if long_hair:  # hair falling beside the face, down past the chin
        draw.rounded_rectangle([cx - rx * 1.45, cy - ry * 1.2, cx + rx * 1.45, cy + ry * 1.45],
                               radius=int(rx * 0.8), fill=hair)
    elif not attrs.get("Bald"):
        draw.ellipse([cx - rx * 1.08, cy - ry * 1.18, cx + rx * 1.08, cy + ry * 0.2], fill=hair)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
    if attrs["Bangs"]:
        draw.rectangle([cx - rx * 0.8, cy - ry * 0.95, cx + rx * 0.8, cy - ry * 0.55], fill=hair)
    if not attrs["No_Beard"]:
        beard = tuple(int(c * 0.45) for c in hair)
        draw.chord([cx - rx * 0.95, cy - ry * 0.1, cx + rx * 0.95, cy + ry * 1.02], 10, 170, fill=beard)
    eye_y = cy - ry * 0.15
    for side in (-1, 1):
        ex = cx + side * rx * 0.4
        draw.ellipse([ex - rx * 0.12, eye_y - rx * 0.08, ex + rx * 0.12, eye_y + rx * 0.08], fill=(30, 30, 40))
        if attrs["Eyeglasses"]:
            draw.rectangle([ex - rx * 0.25, eye_y - rx * 0.17, ex + rx * 0.25, eye_y + rx * 0.17], outline=(10, 10, 10),
                           width=max(1, int(s / 60)))
    mouth_y = cy + ry * 0.5
    lips = (200, 30, 60) if attrs["Wearing_Lipstick"] else tuple(int(c * 0.7) for c in skin)
    box = [cx - rx * 0.35, mouth_y - ry * 0.12, cx + rx * 0.35, mouth_y + ry * 0.12]
    if attrs["Smiling"]:
        draw.chord(box, 0, 180, fill=lips)
    else:
        draw.rectangle([box[0], mouth_y - ry * 0.03, box[2], mouth_y + ry * 0.03], fill=lips)
    if attrs["Wearing_Hat"]:
        draw.rectangle([cx - rx * 1.2, cy - ry * 1.35, cx + rx * 1.2, cy - ry * 0.8], fill=(60, 60, 120))
    pixels = np.asarray(img, dtype=np.float32)
    pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def synth_image(seed: int, index: int, size: tuple[int, int]) -> tuple[dict[str, int], bytes]:
    """Attributes and JPEG bytes of image ``index`` of the data set made with ``seed``."""
    rng = np.random.default_rng([seed, index])
    attrs = _attributes(rng, male=bool(rng.random() < 0.42))
    buffer = io.BytesIO()
    draw_face(rng, attrs, size).save(buffer, format="JPEG", quality=90)
    return attrs, buffer.getvalue()


def write_synthetic_celeba(out: str | Path, n: int = 1000, seed: int = 0, size: tuple[int, int] = (178, 218),
                           split_fractions: tuple[float, float] = (0.8, 0.1)) -> Path:
    """Write ``n`` synthetic images and the three official text files under ``out``.

    ``size`` is (width, height), like CelebA's 178x218. Persons (two photos each) are assigned to train / val /
    test in ``split_fractions`` order (the rest is test), so the splits are identity-disjoint.
    """
    if n < 1:
        raise UserError(f"--n: must be >= 1, got {n}")
    if min(size) < 16:
        raise UserError(f"--size: must be at least 16x16, got {size[0]}x{size[1]}")
    out = Path(out)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    persons = (n + PHOTOS_PER_PERSON - 1) // PHOTOS_PER_PERSON
    attr_lines = [str(n), " ".join(ATTRIBUTES)]
    partition_lines, identity_lines = [], []
    for i in range(n):
        image_id = f"{i + 1:06d}.jpg"
        attrs, jpeg = synth_image(seed, i, size)
        (out / IMAGE_DIR / image_id).write_bytes(jpeg)
        attr_lines.append(image_id + " " + " ".join(f"{1 if attrs[a] else -1:2d}" for a in ATTRIBUTES))
        person = i // PHOTOS_PER_PERSON
        position = person / persons
        split = 0 if position < split_fractions[0] else 1 if position < sum(split_fractions) else 2
        partition_lines.append(f"{image_id} {split}")
        identity_lines.append(f"{image_id} {person + 1}")
    for name, lines in ((ATTR_FILE, attr_lines), (PARTITION_FILE, partition_lines), (IDENTITY_FILE, identity_lines)):
        (out / name).write_text("\n".join(lines) + "\n")
    return out
