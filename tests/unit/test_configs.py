"""The named configs: `celeba-vgg16` is the original study, value by value; its scaled-out twin changes only scale."""
import re
import shlex

import pytest

from genderid.cli import build_parser
from genderid.config import load_config, named_config_path

# ../shared/seed/original-method.md, as config keys.
STUDY = {
    "data.image_size": (218, 178),  # 178x218 RGB (height, width)
    "data.augment": False,  # no augmentation in the final run
    "model.weights": "imagenet",
    "model.width": 1.0,  # the real VGG16
    "model.batch_norm": False,  # Keras VGG16 has no BatchNorm in the backbone
    "model.unfreeze_depth": 1,  # only block5 trains
    "model.head_hidden": 128,  # Dense(128, relu) -> BatchNormalization -> Dense(2)
    "model.dropout": 0.0,
    "train.optimizer": "adam",
    "train.lr": 1e-3,  # Keras Adam default
    "train.weight_decay": 0.0,
    "train.lr_schedule": "constant",
    "train.epochs": 20,
    "train.early_stopping_patience": 2,
    "train.checkpoint_metric": "val_loss",  # the best model by validation loss is kept
    "train.checkpoint_mode": "min",
}
STUDY_GLOBAL_BATCH = 12
# The balanced split: first 20,000 male + 20,000 female, 80/20 train/val (seeded), last 500 + 500 as test.
STUDY_SPLIT = {"split": "balanced", "per_class": 20000, "test_per_class": 500, "seed": 0}


def value(config, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


@pytest.mark.parametrize("key", sorted(STUDY))
def test_celeba_vgg16_is_the_original_study(key):
    assert value(load_config(named_config_path("celeba-vgg16")), key) == STUDY[key]


def test_celeba_vgg16_runs_the_studys_global_batch():
    config = load_config(named_config_path("celeba-vgg16"))
    assert config.train.batch_size * config.scaling.num_workers == STUDY_GLOBAL_BATCH


def test_the_documented_prepare_command_makes_the_studys_split(synthetic_celeba):
    import numpy as np

    from genderid.celeba import SPLITS, read_celeba
    from genderid.prepare import split_for

    text = named_config_path("celeba-vgg16").read_text()
    command = re.search(r"#\s+(genderid prepare .*)", text).group(1)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert {k: getattr(args, k) for k in STUDY_SPLIT} == STUDY_SPLIT
    # The recipe it names, run small: per class 80/20 train/val, and a balanced test set.
    index = read_celeba(str(synthetic_celeba))
    split, description = split_for(index, args.split, per_class=50, test_per_class=10, seed=args.seed)
    for label in (0, 1):
        of_class = split[index.male == label]
        assert [int(np.sum(of_class == SPLITS[s])) for s in ("train", "val", "test")] == [40, 10, 10]
    assert description["val_fraction"] == 0.2


def test_the_scaled_out_recipe_changes_only_workers_learning_rate_and_name():
    study = load_config(named_config_path("celeba-vgg16")).to_dict()
    scaled = load_config(named_config_path("celeba-vgg16-4gpu")).to_dict()
    changed = {(s, k) for s in study for k in study[s] if study[s][k] != scaled[s][k]}
    assert changed == {("scaling", "num_workers"), ("train", "lr"), ("storage", "name")}
    workers = scaled["scaling"]["num_workers"]
    assert scaled["train"]["lr"] == pytest.approx(study["train"]["lr"] * (workers * 12 / STUDY_GLOBAL_BATCH) ** 0.5)
