"""The face front end on photos of real faces: detection recall/precision, accuracy on detected faces, no-face rate.

    python benchmarks/faces_accuracy.py [--checkpoint CKPT] [--photos 200] [--compare-detectors]

Photos are built by genderid.scenes from the val split of ../shared/data/celeba-subset (identities the model never
trained on): 0, 1 or 2 faces each (face boxes 70-150 px wide, tilted up to 10 degrees) in 640x480 scenes. A face
is found when a detected box has IoU >= 0.3 with its true box. With --checkpoint, each found face's label is
compared with CelebA's Male attribute, and the calibrated "uncertain" share is reported. --compare-detectors also
measures dlib's CNN (MMOD) detector (on the first --cnn-photos photos: ~8 s each on one core) and HOG without
upsampling, to justify the default.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
SUBSET = Path(__file__).resolve().parents[2] / "shared/data/celeba-subset"


def val_faces(celeba: Path) -> list[tuple[str, int]]:
    from genderid import celeba as reader

    index = reader.read_celeba(str(celeba))
    split = reader.official_split(index)
    male = index.attributes[:, reader.ATTRIBUTES.index("Male")]
    return [(name, int(m)) for name, m, s in zip(index.image_ids, male, split) if s == 1]


def build_photos(celeba: Path, count: int, seed: int = 0):
    from genderid.scenes import compose

    faces = val_faces(celeba)
    rng = np.random.default_rng(seed)
    photos = []
    for i in range(count):
        n = i % 3  # 0, 1 or 2 faces, in turn
        picks = [faces[k] for k in rng.choice(len(faces), n, replace=False)]
        crops = [Image.open(celeba / "img_align_celeba" / name).convert("RGB") for name, _ in picks]
        photos.append(compose(rng, crops, [male for _, male in picks]))
    return photos


def score(photos, detect) -> dict:
    from genderid.scenes import match

    true_total = found_total = matched_total = empty_ok = empty_total = 0
    started = time.perf_counter()
    results = []
    for scene in photos:
        boxes = detect(scene.photo)
        pairs = match(scene.boxes, boxes)
        results.append(pairs)
        true_total += len(scene.boxes)
        found_total += len(boxes)
        matched_total += len(pairs)
        if not scene.boxes:
            empty_total += 1
            empty_ok += not boxes
    seconds = time.perf_counter() - started
    return {"recall": matched_total / max(true_total, 1), "precision": matched_total / max(found_total, 1),
            "no_face_ok": empty_ok / max(empty_total, 1), "faces": true_total, "found": found_total,
            "ms_per_photo": 1000 * seconds / len(photos), "pairs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--celeba", default=str(SUBSET))
    parser.add_argument("--checkpoint", help="a trained checkpoint (e.g. cpu.yaml's best.json) for accuracy")
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--compare-detectors", action="store_true")
    parser.add_argument("--cnn-photos", type=int, default=45, help="photos for the (slow) CNN detector")
    args = parser.parse_args()
    from genderid.faces import FaceFrontEnd, FaceSettings, _dlib_models, _model_file

    photos = build_photos(Path(args.celeba), args.photos)
    rows = []
    variants = {"dlib HOG, upsample 1 (default)": FaceSettings()}
    if args.compare_detectors:
        variants["dlib HOG, upsample 0"] = FaceSettings(upsample=0)
    for name, settings in variants.items():
        front = FaceFrontEnd(settings)
        rows.append((name, score(photos, lambda p: [f.box for f in front.faces(p)])))
    if args.compare_detectors:
        dlib = _dlib_models()[0]
        cnn = dlib.cnn_face_detection_model_v1(_model_file("mmod_human_face_detector.dat"))

        def detect_cnn(photo):
            return [(d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1)
                    for d in cnn(np.asarray(photo), 1)]

        rows.append((f"dlib CNN (MMOD), upsample 1, first {args.cnn_photos} photos",
                     score(photos[:args.cnn_photos], detect_cnn)))
        rows.append((f"dlib HOG, upsample 1, the same {args.cnn_photos} photos",
                     score(photos[:args.cnn_photos], lambda p: [f.box for f in FaceFrontEnd().faces(p)])))
    print(f"{len(photos)} photos (640x480; 0, 1 or 2 faces each) from the subset's val split\n")
    print("| detector | faces | detections | recall | precision | no-face photos answered empty | ms per photo |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['faces']} | {r['found']} | {r['recall']:.3f} | {r['precision']:.3f} | "
              f"{r['no_face_ok']:.3f} | {r['ms_per_photo']:.0f} |")
    if args.checkpoint:
        from genderid.predictor import Predictor
        from genderid.scenes import match

        predictor = Predictor.from_checkpoint(args.checkpoint)
        correct = total = uncertain = confident_correct = confident = 0
        for scene in photos:
            answer = predictor.predict_faces(scene.photo)
            for i, j in match(scene.boxes, [f["box"] for f in answer["faces"]]):
                face = answer["faces"][j]
                right = int(face["label"] == "male") == scene.labels[i]
                total += 1
                correct += right
                uncertain += face["uncertain"]
                if not face["uncertain"]:
                    confident += 1
                    confident_correct += right
        print(f"\nWith {args.checkpoint} (model {predictor.model_version}, temperature "
              f"{predictor.calibration.temperature:.3f}): accuracy on the {total} detected faces "
              f"{correct / max(total, 1):.3f}; uncertain {uncertain / max(total, 1):.3f} of them; accuracy of the "
              f"others {confident_correct / max(confident, 1):.3f}")


if __name__ == "__main__":
    main()
