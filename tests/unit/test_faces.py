"""The face front end (no Ray): alignment maths, the settings a checkpoint carries, and detection on real faces."""
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from genderid.faces import (CELEBA_TEMPLATE, TEMPLATE_FRAME, FaceFrontEnd, FaceSettings, align, apply_transform,
                            frame_size, similarity_transform)
from genderid.preprocess import Preprocessing
from genderid.scenes import background, compose, match


def rotation(degrees, scale, shift):
    t = np.deg2rad(degrees)
    m = np.zeros((2, 3))
    m[:, :2] = scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    m[:, 2] = shift
    return m


def test_the_similarity_transform_recovers_a_known_one_exactly():
    template = np.asarray(CELEBA_TEMPLATE)
    known = rotation(23.0, 2.7, (310.0, -45.0))
    landmarks = apply_transform(known, template)
    fitted = similarity_transform(landmarks, template)
    assert np.allclose(apply_transform(fitted, landmarks), template, atol=1e-9)
    assert np.allclose(apply_transform(fitted, apply_transform(known, [[5.0, 7.0]])), [[5.0, 7.0]], atol=1e-9)


@pytest.mark.parametrize("degrees,scale", [(0.0, 1.0), (17.0, 3.1), (-30.0, 0.6), (8.0, 9.0)])
def test_align_puts_known_landmarks_onto_the_template(degrees, scale):
    """Dots painted at a face's landmarks, anywhere in a photo, land on the template's points in the aligned crop."""
    template = np.asarray(CELEBA_TEMPLATE)
    known = rotation(degrees, scale, (600.0, 500.0))
    landmarks = apply_transform(known, template - template.mean(0))
    photo = Image.new("RGB", (1400, 1200), (0, 0, 0))
    draw = ImageDraw.Draw(photo)
    radius = 3 * scale
    for (x, y), colour in zip(landmarks, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    crop = np.asarray(align(photo, landmarks), dtype=np.float64)
    assert crop.shape == (TEMPLATE_FRAME[1], TEMPLATE_FRAME[0], 3)
    for channel, (tx, ty) in enumerate(template):
        weight = crop[:, :, channel]
        ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
        centre = ((weight * xs).sum() / weight.sum() + 0.5, (weight * ys).sum() / weight.sum() + 0.5)
        assert centre == pytest.approx((tx, ty), abs=1.0)


def test_the_crop_is_celebas_frame_scaled_to_the_model_input():
    assert frame_size((218, 178)) == (178, 218)
    assert frame_size((108, 88)) == (88, 108)
    assert frame_size((224, 224)) == (224, 274)  # covers the input; Preprocessing centre-crops as in training


def test_face_settings_travel_in_preprocessing_and_are_validated():
    settings = FaceSettings(upsample=2, min_score=0.3, detect_max_side=1024)
    preprocessing = Preprocessing(image_size=(108, 88), faces=settings)
    assert Preprocessing.from_dict(preprocessing.to_dict()) == preprocessing
    older = {k: v for k, v in Preprocessing().to_dict().items() if k != "faces"}  # a checkpoint from before
    assert Preprocessing.from_dict(older).faces == FaceSettings()
    for bad in ({"detector": "magic"}, {"upsample": 7}, {"detect_max_side": 10}, {"other": 1}):
        with pytest.raises(ValueError):
            Preprocessing.from_dict({**preprocessing.to_dict(), "faces": {**settings.to_dict(), **bad}})


def test_a_photo_without_faces_has_none():
    front = FaceFrontEnd()
    rng = np.random.default_rng(3)
    assert sum(len(front.faces(background(rng, (640, 480)))) for _ in range(10)) == 0


@pytest.fixture(scope="module")
def real_faces(real_celeba):
    from genderid import celeba

    index = celeba.read_celeba(str(real_celeba))
    val = np.flatnonzero(celeba.official_split(index) == 1)[:40]
    male = index.attributes[:, celeba.MALE]
    return [(Image.open(real_celeba / "img_align_celeba" / index.image_ids[i]).convert("RGB"), int(male[i]))
            for i in val]


@pytest.mark.real
def test_real_faces_in_scenes_are_found_where_they_are_and_aligned_like_celeba(real_faces):
    front = FaceFrontEnd()
    rng = np.random.default_rng(0)
    true_total = found_total = matched = 0
    for k in range(0, len(real_faces), 2):
        pair = real_faces[k:k + 2]
        scene = compose(rng, [f for f, _ in pair], [m for _, m in pair])
        faces = front.faces(scene.photo)
        assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)  # largest first
        true_total, found_total = true_total + len(scene.boxes), found_total + len(faces)
        pairs = match(scene.boxes, [f.box for f in faces])
        matched += len(pairs)
        for i, j in pairs:
            # The aligned crop puts the eyes where CelebA's crops have them: the crop's own landmarks, found
            # again, sit on the template (within a few pixels of 178x218).
            again = front.faces(faces[j].crop.resize(TEMPLATE_FRAME), max_faces=1)
            if again:
                assert np.abs(again[0].landmarks[:2] - np.asarray(CELEBA_TEMPLATE)[:2]).max() < 8
    assert matched / true_total >= 0.9 and matched / found_total >= 0.9


@pytest.mark.real
def test_max_faces_keeps_the_largest_and_exif_orientation_is_applied(real_faces):
    from genderid.preprocess import open_image

    front = FaceFrontEnd()
    # Two faces the detector finds on their own crops (CelebA holds profiles a frontal detector misses).
    detectable = [face for face, _ in real_faces if front.faces(face.resize(TEMPLATE_FRAME))][:2]
    scene = compose(np.random.default_rng(5), detectable, [0, 1], face_width=(100, 150), max_angle=3)
    every = front.faces(scene.photo)
    assert len(every) == 2
    largest = front.faces(scene.photo, max_faces=1)
    assert len(largest) == 1 and largest[0].box == every[0].box
    # The same photo stored on its side with an EXIF "rotate 90 CW" tag: boxes come back in the upright pixels.
    stored = scene.photo.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif)
    upright = open_image(buffer.getvalue())
    assert upright.size == scene.photo.size
    found = front.faces(upright)
    assert len(match(scene.boxes, [f.box for f in found])) == 2
    assert len(match([f.box for f in every], [f.box for f in found], threshold=0.5)) == 2  # JPEG moves boxes a bit


@pytest.mark.real
def test_prepare_align_stores_aligned_faces_and_counts_photos_without_one(real_faces, tmp_path):
    """A CelebA-layout folder of photos (faces in scenes, and scenes without one) -> aligned 178x218 crops."""
    from genderid import celeba, shards

    front = FaceFrontEnd()
    detectable = [(face, male) for face, male in real_faces if front.faces(face.resize(TEMPLATE_FRAME))][:6]
    from conftest import write_celeba_folder

    rng = np.random.default_rng(2)
    photos = []
    for i in range(9):
        if i < 6:
            face, male = detectable[i]
            photos.append((compose(rng, [face], [male], face_width=(90, 140), max_angle=5).photo, male, i % 3))
        else:
            photos.append((compose(rng, [], []).photo, i % 2, i % 3))
    folder = write_celeba_folder(tmp_path / "photos", photos)
    rows = [(f"{i + 1:06d}.jpg", None, None) for i in range(9)]
    index = celeba.read_celeba(str(folder))
    manifest = shards.prepare_dataset(index, celeba.official_split(index), str(tmp_path / "out"),
                                      {"recipe": "official"}, run_tasks=lambda fn, specs: [fn(s) for s in specs],
                                      align=FaceSettings().to_dict())
    assert manifest["aligned"]["no_face"] == {"count": 3, "images": ["000007.jpg", "000008.jpg", "000009.jpg"]}
    assert manifest["aligned"]["frame"] == [178, 218] and manifest["rows"] == 6
    table = shards.read_table(str(tmp_path / "out"))
    assert table["image_id"].to_pylist() == [n for n, _, _ in rows[:6]]
    for data in table["image"].to_pylist():
        crop = Image.open(io.BytesIO(data))
        assert crop.format == "JPEG" and crop.size == TEMPLATE_FRAME
        again = front.faces(crop.convert("RGB"), max_faces=1)
        assert again and np.abs(again[0].landmarks[:2] - np.asarray(CELEBA_TEMPLATE)[:2]).max() < 8


@pytest.mark.real
def test_predict_faces_locally_from_the_cli_with_an_annotated_copy(real_faces, tmp_path):
    import json
    import subprocess
    import sys

    import torch

    from genderid.checkpoint import save_checkpoint
    from genderid.model import GenderNet
    from genderid.predictor import Predictor

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "ckpt", GenderNet(width=0.1, batch_norm=True, head_hidden=16).eval(),
                                 preprocessing=Preprocessing(image_size=(108, 88)))
    front = FaceFrontEnd()
    detectable = [face for face, _ in real_faces if front.faces(face.resize(TEMPLATE_FRAME))][:2]
    scene = compose(np.random.default_rng(4), detectable, [0, 1], face_width=(90, 140), max_angle=5)
    photo = tmp_path / "photo.png"
    scene.photo.save(photo)
    out = tmp_path / "annotated.jpg"
    cli = [sys.executable, "-m", "genderid", "predict", "--faces", str(photo), "--checkpoint", str(checkpoint)]
    run = subprocess.run(cli + ["--annotate", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    expected = Predictor.from_checkpoint(str(checkpoint)).predict_faces(photo.read_bytes())
    assert {k: v for k, v in printed.items() if k != "image"} == json.loads(json.dumps(expected))
    assert len(match(scene.boxes, [f["box"] for f in printed["faces"]])) == 2
    assert Image.open(out).size == scene.photo.size
    run = subprocess.run(cli[:4] + [str(photo), "--checkpoint", str(checkpoint), "--annotate", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--faces" in run.stderr
