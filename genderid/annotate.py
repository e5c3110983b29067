"""Draw ``POST /faces`` answers on their photo: a box per face, its label, ``p_male``, the uncertain flag. Pure PIL."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from genderid.preprocess import open_image

COLOURS = {"male": (40, 110, 230), "female": (220, 50, 120)}
UNCERTAIN = (150, 150, 150)


def annotate(photo: Image.Image, faces: Sequence[dict]) -> Image.Image:
    """A copy of ``photo`` with each face's box and ``label p_male`` (``?`` when uncertain) drawn on it."""
    out = photo.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 400))
    for face in faces:
        x0, y0, x1, y1 = face["box"]
        colour = UNCERTAIN if face.get("uncertain") else COLOURS.get(face["label"], (255, 200, 0))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{face['label']} {face['p_male']:.2f}" + (" ?" if face.get("uncertain") else "")
        left, top, right, bottom = draw.textbbox((x0, y0), text)
        top_of_label = max(0, y0 - (bottom - top) - 4)
        draw.rectangle((x0, top_of_label, x0 + (right - left) + 6, top_of_label + (bottom - top) + 4), fill=colour)
        draw.text((x0 + 3, top_of_label + 1), text, fill=(255, 255, 255))
    return out


def annotate_file(photo_path: str, faces: Sequence[dict], out: str, several: bool = False) -> Path:
    """Draw ``faces`` on the photo at ``photo_path`` (EXIF orientation applied, as the boxes are) and save it to
    ``out``, or to ``OUT-<photo name>.jpg`` when annotating several photos; returns where it went."""
    target = Path(out)
    if several:
        target = target.with_name(f"{target.stem}-{Path(photo_path).stem}{target.suffix or '.jpg'}")
    photo = open_image(Path(photo_path).read_bytes())
    annotate(photo, faces).save(target, quality=92)
    return target
