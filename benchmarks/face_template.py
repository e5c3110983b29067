"""Derive genderid.faces.CELEBA_TEMPLATE: mean dlib 5-point landmarks (eye centres, nose) on CelebA's aligned crops.

    python benchmarks/face_template.py [--celeba ../shared/data/celeba-subset] [--n 1000]

Runs dlib's detector and 5-point model on the first N images of img_align_celeba and prints the mean positions of
the left eye centre, right eye centre and nose base, and the mean face box, in the 178x218 frame (the subset's
89x109 images are scaled up by their ratio to it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeba", default=str(Path(__file__).resolve().parents[2] / "shared/data/celeba-subset"))
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    from genderid.faces import TEMPLATE_FRAME, FaceFrontEnd, FaceSettings

    # Upsampled twice: the subset's faces are ~47 px wide, below the HOG window at 1x.
    front = FaceFrontEnd(FaceSettings(upsample=2))
    files = sorted((Path(args.celeba) / "img_align_celeba").glob("*.jpg"))[:args.n]
    landmarks, boxes, missed = [], [], 0
    for path in files:
        photo = Image.open(path).convert("RGB")
        faces = front.faces(photo, max_faces=1)
        if not faces:
            missed += 1
            continue
        ratio = TEMPLATE_FRAME[0] / photo.width
        landmarks.append(faces[0].landmarks * ratio)
        boxes.append(np.asarray(faces[0].box) * ratio)
    mean = np.mean(landmarks, 0)
    print(f"{len(landmarks)} of {len(files)} images ({missed} without a face found)")
    print("CELEBA_TEMPLATE = (" + ", ".join(f"({x:.2f}, {y:.2f})" for x, y in mean) + ")")
    print("CELEBA_TEMPLATE_BOX = (" + ", ".join(f"{v:.1f}" for v in np.mean(boxes, 0)) + ")")
    print("landmark spread (std, px):", np.round(np.std(landmarks, 0), 2).tolist())


if __name__ == "__main__":
    main()
