"""The local loop trains the recipe it is given, as Ray Train's loop does, and repeats itself exactly."""
import pytest
import torch

from conftest import prepare
from genderid import celeba
from genderid.config import load_config, named_config_path
from genderid.local_train import read_split, train_local


@pytest.fixture(scope="module")
def source(synthetic_celeba, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "prepared"
    prepare(synthetic_celeba, out)
    return str(out)


def weights(source, *overrides):
    config = load_config(named_config_path("tiny"), [f"data.source={source}", "train.epochs=2", *overrides])
    run = train_local(config, source)
    assert len(run.history) == 2 and all(0.0 <= row["val_accuracy"] <= 1.0 for row in run.history)
    return run.model.state_dict()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_read_split_keeps_bytes_labels_and_attributes(source):
    train = read_split(source, "train")
    assert isinstance(train["image"][0], bytes) and len(train["image"]) == len(train["male"]) > 0
    assert train["attributes"].shape == (len(train["male"]), len(celeba.ATTRIBUTES))


@pytest.fixture(scope="module")
def base(source):
    return weights(source)


def test_the_same_recipe_twice_makes_the_same_weights(source, base):
    # The negative control of the test below: a difference there is the option's, not the loop's noise.
    assert same(base, weights(source))


@pytest.mark.parametrize("option", ["train.label_smoothing=0.1", "train.mixup=0.2", "train.lr_schedule=cosine",
                                    "train.warmup_epochs=1", "data.augment=false",
                                    "train.weight_average_decay=0.9"])
def test_each_recipe_option_changes_what_the_local_loop_makes(source, base, option):
    assert not same(base, weights(source, option))
