import dataclasses

import pytest

from genderid.config import Config, ConfigError, config_from_dict, load_config, named_config_path


@pytest.mark.parametrize("name", ["tiny", "cpu", "celeba-vgg16"])
def test_named_configs_load_and_round_trip(name):
    config = load_config(named_config_path(name))
    assert isinstance(config, Config)
    assert config_from_dict(config.to_dict()) == config


def test_original_recipe_matches_the_seed_study():
    config = load_config(named_config_path("celeba-vgg16"))
    assert config.model.weights == "imagenet" and config.model.width == 1.0 and not config.model.batch_norm
    assert config.data.image_size == (218, 178)
    assert config.model.unfreeze_depth == 1 and config.model.head_hidden == 128
    assert (config.train.optimizer, config.train.lr, config.train.batch_size) == ("adam", 1e-3, 12)
    assert config.train.early_stopping_patience == 2 and config.train.checkpoint_metric == "val_loss"


def test_dotted_overrides_are_typed():
    config = load_config(named_config_path("tiny"), ["train.lr=3e-4", "scaling.num_workers=4",
                                                     "data.image_size=[64, 48]", "scaling.use_gpu=true",
                                                     "tune.unfreeze_depth=[0, 2]", "storage.path=s3://b/p"])
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.scaling.num_workers == 4 and config.scaling.use_gpu is True
    assert config.data.image_size == (64, 48)
    assert config.tune.unfreeze_depth == [0, 2]
    assert config.storage.path == "s3://b/p"


def test_defaults_without_a_file():
    assert load_config() == Config()


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("trian.lr=1", "trian"),
    ("model.unfreeze_depth=7", "model.unfreeze_depth"),
    ("model.unfreeze_depth=two", "model.unfreeze_depth"),
    ("train.lr=abc", "train.lr"),
    ("train.lr=-1", "train.lr"),
    ("scaling.use_gpu=maybe", "scaling.use_gpu"),
    ("train.optimizer=rmsprop", "train.optimizer"),
    ("data.image_size=[64]", "data.image_size"),
    ("data.decode_tasks=-1", "data.decode_tasks"),
    ("model.width=0", "model.width"),
    ("tune.lr=[0.1, 0.01]", "tune.lr"),
    ("storage.name=a/b", "storage.name"),
    ("train=3", "train"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(named_config_path("tiny"), [override])
    assert str(info.value).startswith(key)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  widht: 0.5\n")
    with pytest.raises(ConfigError, match=r"^model\.widht: unknown key"):
        load_config(path)


def test_imagenet_weights_need_full_width():
    with pytest.raises(ConfigError, match="model.width"):
        load_config(None, ["model.weights=imagenet", "model.width=0.5"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_contract_key_exists():
    config = Config()
    for dotted in ["data.source", "data.image_size", "model.weights", "model.unfreeze_depth", "model.width",
                   "train.epochs", "train.lr", "train.batch_size", "train.early_stopping_patience",
                   "scaling.num_workers", "scaling.use_gpu", "storage.path", "storage.name", "tune.num_samples",
                   "tune.max_concurrent_trials", "tune.lr", "tune.unfreeze_depth"]:
        section, key = dotted.split(".")
        assert key in {f.name for f in dataclasses.fields(getattr(config, section))}, dotted


def test_auto_torch_threads_share_the_nodes_cores_among_the_workers_that_run_there():
    from genderid.train_ray import worker_threads

    assert worker_threads(2, 1, use_gpu=False) == 2  # a lone 1-CPU worker on 2 cores: both (Ray alone gives 1)
    assert worker_threads(2, 2, use_gpu=False) == 1  # two workers, or one worker of each of two trials
    assert worker_threads(8, 3, use_gpu=False) == 2
    assert worker_threads(2, 4, use_gpu=False) == 1  # never 0
