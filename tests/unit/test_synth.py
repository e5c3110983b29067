import numpy as np
import torch

from genderid import celeba, engine
from genderid.batches import to_model_batch
from genderid.celeba import read_celeba
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing
from genderid.synth import write_synthetic_celeba


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_complete_official_layout(tmp_path):
    folder = write_synthetic_celeba(tmp_path / "s", n=12, size=(40, 50))
    assert {p.name for p in folder.iterdir()} == {celeba.IMAGE_DIR, celeba.ATTR_FILE, celeba.PARTITION_FILE,
                                                  celeba.IDENTITY_FILE}
    index = read_celeba(str(folder))
    assert index.image_ids[0] == "000001.jpg" and len(index.image_ids) == 12
    from PIL import Image

    with Image.open(folder / celeba.IMAGE_DIR / "000001.jpg") as img:
        assert img.size == (40, 50) and img.format == "JPEG"


def test_deterministic_per_seed(tmp_path):
    a = folder_bytes(write_synthetic_celeba(tmp_path / "a", n=10, seed=3, size=(32, 32)))
    b = folder_bytes(write_synthetic_celeba(tmp_path / "b", n=10, seed=3, size=(32, 32)))
    c = folder_bytes(write_synthetic_celeba(tmp_path / "c", n=10, seed=4, size=(32, 32)))
    assert a == b
    assert a["img_align_celeba/000001.jpg"] != c["img_align_celeba/000001.jpg"]


def test_other_attributes_vary_so_slices_are_not_empty(synthetic_celeba):
    index = read_celeba(str(synthetic_celeba))
    varying = [name for column, name in enumerate(celeba.ATTRIBUTES) if 0 < index.attributes[:, column].sum() < 240]
    assert len(varying) >= 10
    assert {"Male", "Eyeglasses", "Smiling", "No_Beard", "Wearing_Lipstick"} <= set(varying)


def test_splits_are_identity_disjoint(synthetic_celeba):
    index = read_celeba(str(synthetic_celeba))
    persons = [set(index.identity[index.partition == s]) for s in (0, 1, 2)]
    assert all(persons[i].isdisjoint(persons[j]) for i in range(3) for j in range(i + 1, 3))


def test_male_is_learnable_but_not_from_colour_alone(tmp_path):
    folder = write_synthetic_celeba(tmp_path / "learn", n=1600, seed=0, size=(48, 48))
    index = read_celeba(str(folder))
    images = [(folder / celeba.IMAGE_DIR / i).read_bytes() for i in index.image_ids]
    columns = {"image": images, "male": index.male, **{n: index.attributes[:, c] for c, n in enumerate(celeba.ATTRIBUTES)}}
    batch = to_model_batch(columns, Preprocessing(image_size=(32, 32)))
    train, held_out = index.partition == 0, index.partition != 0

    # Global colour statistics alone are a weak cue: a least-squares probe on mean RGB stays far from 90%.
    features = np.c_[batch["image"].mean(axis=(2, 3)), np.ones(len(images))]
    weights = np.linalg.lstsq(features[train], batch["male"][train] * 2.0 - 1, rcond=None)[0]
    colour_accuracy = np.mean((features[held_out] @ weights > 0) == batch["male"][held_out])
    assert colour_accuracy < 0.8

    torch.manual_seed(0)
    model = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=5)
    optimizer = engine.make_optimizer(model, "adamw", 1e-3, 5e-4)
    for epoch in range(8):
        engine.train_one_epoch(model, engine.tensor_batches(batch["image"][train], batch["male"][train], 32,
                                                            shuffle_seed=epoch, drop_last=True), optimizer)
    metrics = engine.evaluate(model, engine.tensor_batches(batch["image"][held_out], batch["male"][held_out], 64))
    assert metrics["accuracy"] >= 0.90
