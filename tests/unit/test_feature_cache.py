"""The frozen-prefix feature cache without Ray: same training on cached features, its key, its format."""
import copy
import json

import numpy as np
import pytest
import torch

from genderid import engine, feature_cache
from genderid.config import ConfigError, load_config, named_config_path
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing


def pretrained(seed=0, **fields):
    """A fixed state dict standing in for pretrained weights (non-trivial BatchNorm statistics included)."""
    torch.manual_seed(seed)
    net = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=5, **fields)
    net.train()
    with torch.no_grad():  # a few forward passes give the BatchNorm layers running statistics of their own
        for _ in range(3):
            net(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return net.state_dict()


def batches_of(inputs, labels, size=8):
    return [{"image": inputs[i:i + size], "male": labels[i:i + size]} for i in range(0, len(labels), size)]


@pytest.mark.parametrize("unfreeze_depth", [0, 1, 2])
def test_training_on_cached_features_reaches_the_same_weights(unfreeze_depth):
    state = pretrained()
    torch.manual_seed(1)
    images, labels = torch.randn(48, 3, 32, 32), torch.randint(0, 2, (48,))

    def fresh():
        net = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=unfreeze_depth)
        net.load_state_dict(state)
        return net

    frozen = 5 - unfreeze_depth
    on_images, on_features = fresh(), fresh()
    features = feature_cache.prefix_outputs(fresh(), images, [frozen])[frozen]
    on_features.set_input_blocks(frozen)
    for net, inputs in ((on_images, images), (on_features, features)):
        torch.manual_seed(7)  # dropout and anything random in the step draw the same numbers
        optimizer = engine.make_optimizer(net, "adamw", 1e-2)
        engine.train_one_epoch(net, batches_of(inputs, labels), optimizer)
    moved = 0
    for (name, a), b in zip(on_images.state_dict().items(), on_features.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
        moved += int(not torch.equal(a, state[name]))
    assert moved > 0  # training changed the weights: the equality above is not the trivial one
    # Eval on cached features gives the predictions of the model that takes images.
    expected = engine.predict(on_images, batches_of(images, labels))
    got = engine.predict(on_features, batches_of(features, labels))
    np.testing.assert_allclose(got.p_male, expected.p_male, atol=1e-5)


def test_prefix_outputs_come_from_frozen_blocks_in_eval_mode():
    net = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=2)
    net.load_state_dict(pretrained())
    images = torch.randn(4, 3, 32, 32)
    outputs = feature_cache.prefix_outputs(net, images, [3])
    assert not net.training or all(not m.training for m in net.features[:net.block_bounds[3]])
    with torch.no_grad():
        reference = net.eval().features[:net.block_bounds[3]](images)
    assert torch.equal(outputs[3], reference) and outputs[3].shape == (4, 16, 4, 4)
    one_pass = feature_cache.prefix_outputs(net, images, [1, 3])
    assert torch.equal(one_pass[3], reference) and one_pass[1].shape == (4, 4, 16, 16)
    with pytest.raises(ValueError, match="frozen blocks"):
        feature_cache.prefix_outputs(net, images, [4])  # block 4 trains in this model: not a frozen prefix


def test_input_blocks_only_skip_frozen_blocks():
    net = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=2)
    with pytest.raises(ValueError, match="frozen"):
        net.set_input_blocks(4)
    net.set_input_blocks(3)
    with pytest.raises(ValueError, match="already been through"):
        net.set_unfreeze_depth(3)
    assert feature_cache.frozen_blocks_of([0, 1, 2, 5, 1]) == [3, 4, 5]


def write_source(folder, content=b'{"format": "genderid-parquet", "files": ["v1/a.parquet"]}'):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_manifest.json").write_bytes(content)
    return str(folder)


def test_key_changes_with_everything_the_features_depend_on(tmp_path):
    source = write_source(tmp_path / "data")
    net = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=0)
    net.load_state_dict(pretrained())
    prep = Preprocessing(image_size=(32, 32))
    base = feature_cache.key_fields(net, 3, prep, source)
    assert feature_cache.cache_key(base) == feature_cache.cache_key(feature_cache.key_fields(net, 3, prep, source))
    other_weights = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=0)
    other_weights.load_state_dict(pretrained(seed=1))
    later_blocks_changed = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=0)
    state = pretrained()
    state["features.40.weight"] = state["features.40.weight"] + 1  # block 5: not in a 3-block prefix
    later_blocks_changed.load_state_dict(state)
    variants = [
        feature_cache.key_fields(other_weights, 3, prep, source),
        feature_cache.key_fields(net, 4, prep, source),
        feature_cache.key_fields(net, 3, Preprocessing(image_size=(32, 40)), source),
        feature_cache.key_fields(net, 3, prep, write_source(tmp_path / "data2", b'{"files": ["v2/a.parquet"]}')),
    ]
    keys = {feature_cache.cache_key(v) for v in variants}
    assert len(keys) == 4 and feature_cache.cache_key(base) not in keys
    assert feature_cache.key_fields(later_blocks_changed, 3, prep, source) == base


def test_a_written_cache_reads_back_exactly_and_its_manifest_is_checked(tmp_path):
    cache = str(tmp_path / "cache")
    fields = {"weights_sha256": "ab" * 32, "frozen_blocks": 4}
    rng = np.random.default_rng(0)
    features = rng.standard_normal((10, 8, 2, 3)).astype(np.float32)
    male = np.array([0, 1] * 5)
    parts = {"train": [feature_cache.write_part(cache, "train", [f"{i}.jpg" for i in range(6)], male[:6],
                                                features[:6])],
             "val": [feature_cache.write_part(cache, "val", [f"{i}.jpg" for i in range(6, 10)], male[6:],
                                              features[6:])]}
    with pytest.raises(feature_cache.FeatureCacheError, match="did not finish"):
        feature_cache.read_manifest(cache)  # parts without a manifest: an unfinished build
    feature_cache.write_manifest(cache, fields, (8, 2, 3), parts)
    manifest = feature_cache.read_manifest(cache, fields)
    assert manifest["rows"] == {"train": 6, "val": 4}
    got = list(feature_cache.feature_batches(cache, "val", batch_size=3))
    assert [len(b["male"]) for b in got] == [3, 1]
    assert np.array_equal(torch.cat([b["image"] for b in got]).numpy(), features[6:])
    assert torch.cat([b["male"] for b in got]).tolist() == male[6:].tolist()
    with pytest.raises(feature_cache.FeatureCacheError, match="other weights"):
        feature_cache.read_manifest(cache, {**fields, "frozen_blocks": 3})

    def tampered(change):
        broken = copy.deepcopy(manifest)
        change(broken)
        (tmp_path / "cache" / "_manifest.json").write_text(json.dumps(broken))
        with pytest.raises(feature_cache.FeatureCacheError) as error:
            feature_cache.read_manifest(cache)
        return str(error.value)

    assert "files.train" in tampered(lambda m: m["files"]["train"].append("../../etc/passwd"))
    assert "files.val" in tampered(lambda m: m["files"].update(val=["train/part-" + "0" * 32 + ".parquet"]))
    assert "shape" in tampered(lambda m: m.update(shape=[8, -2, 3]))
    assert "dtype" in tampered(lambda m: m.update(dtype="float16"))
    assert "genderid-feature-cache" in tampered(lambda m: m.update(format_version=99))
    with pytest.raises(feature_cache.FeatureCacheError, match="48 bytes"):
        feature_cache.decode_features([b"\0" * 47], (4, 3, 1))


def test_the_cache_is_refused_where_one_output_per_image_would_be_wrong(tmp_path):
    tiny = named_config_path("tiny")
    usable = ["data.augment=false", f"model.weights={tmp_path / 'w.pt'}"]
    for key in ("train.feature_cache", "tune.feature_cache"):
        load_config(tiny, [f"{key}=true", *usable])
        with pytest.raises(ConfigError, match=f"{key}: needs data.augment=false"):
            load_config(tiny, [f"{key}=true", usable[1]])
        with pytest.raises(ConfigError, match=f"{key}: needs pretrained model.weights"):
            load_config(tiny, [f"{key}=true", usable[0]])
        with pytest.raises(ConfigError, match=f"{key}: needs train.mixup=0"):
            load_config(tiny, [f"{key}=true", *usable, "train.mixup=0.2"])


def test_parts_are_few_but_several_per_worker():
    assert feature_cache.rows_per_part(8021, 1) == 512  # 16 parts: Ray Data's per-file cost stays ~2 s a pass
    assert feature_cache.rows_per_part(2000, 1) == 250  # 8 parts for the one worker
    assert feature_cache.rows_per_part(480, 2) == 64  # small splits: parts of at least 64 rows
    assert feature_cache.rows_per_part(0, 2) == 64
