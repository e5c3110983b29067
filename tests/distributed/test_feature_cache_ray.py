"""The frozen-prefix feature cache on the shared cluster: a sweep builds it with Ray Data and trains on it."""
import json

import numpy as np
import pytest
import torch

from genderid import engine, feature_cache, runs, shards
from genderid.batches import to_model_batch
from genderid.celeba import SPLITS
from genderid.checkpoint import load_checkpoint
from genderid.config import load_config, named_config_path
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing
from genderid.train_hooks import RecordInputs

pytestmark = pytest.mark.ray


def pretrained_weights(path):
    """A fixed VGG16 state dict standing in for pretrained weights (BatchNorm statistics of its own)."""
    torch.manual_seed(0)
    net = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=5)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    torch.save(net.state_dict(), path)
    return net.state_dict()


def decoded(source, split, size=(32, 32)):
    """image_id -> the split's decoded images, and the labels, as the pure decode step makes them."""
    table = shards.read_table(source)
    rows = table.filter(np.asarray(table["split"]) == SPLITS[split])
    batch = to_model_batch({n: rows[n].to_numpy(zero_copy_only=False) for n in rows.column_names},
                           Preprocessing(image_size=size))
    return [str(i) for i in rows["image_id"].to_pylist()], batch


def test_a_sweep_on_the_feature_cache_trains_its_trials_on_cached_features(ray_cluster, prepared, tmp_path, capsys):
    from genderid.feature_cache_ray import ensure
    from genderid.tune_ray import run_sweep

    state = pretrained_weights(tmp_path / "pretrained.pt")
    source = str(prepared / "prepared")
    overrides = [f"data.source={source}", f"storage.path={tmp_path / 'sweeps'}", "storage.name=cached",
                 "data.augment=false", f"model.weights={tmp_path / 'pretrained.pt'}", "tune.feature_cache=true",
                 "tune.num_samples=2", "tune.max_epochs=2", "tune.grace_period=2", "tune.unfreeze_depth=[0, 1]",
                 "train.early_stopping_patience=0", "tracking.enabled=false"]
    config = load_config(named_config_path("tiny"), overrides)
    record = tmp_path / "record"
    record.mkdir()
    rows, best = run_sweep(config, hooks=RecordInputs(str(record)))
    assert "[cache] computed the features of the first 4, 5 conv block(s)" in capsys.readouterr().out
    assert len(rows) == 2 and all(r["ended"] == "completed" for r in rows)

    # One cache per frozen prefix, holding every train and val image exactly once.
    root = runs.feature_cache_root(config.storage.path)
    counts = shards.read_manifest(source)["counts"]
    manifests = {}
    for name in sorted(p.name for p in (tmp_path / "sweeps" / "feature_cache").iterdir()):
        manifest = feature_cache.read_manifest(f"{root}/{name}")
        manifests[manifest["fields"]["frozen_blocks"]] = (f"{root}/{name}", manifest)
        assert manifest["rows"] == {"train": counts["train"]["total"], "val": counts["val"]["total"]}
    assert sorted(manifests) == [4, 5]
    # Its features are the pure prefix's outputs for those images (Ray Data decoded and batched them its own way).
    ids, images = decoded(source, "val")
    net = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=0)
    net.load_state_dict(state)
    reference = feature_cache.prefix_outputs(net, torch.from_numpy(images["image"]), [4])[4].numpy()
    cached = {}
    import pyarrow.parquet as pq
    for uri in feature_cache.part_uris(manifests[4][0], manifests[4][1], "val"):
        table = pq.read_table(uri)
        for image_id, value in zip(table["image_id"].to_pylist(),
                                   feature_cache.decode_features(table["image"].to_pylist(), manifests[4][1]["shape"])):
            cached[image_id] = value
    assert sorted(cached) == sorted(ids)
    np.testing.assert_allclose(np.stack([cached[i] for i in ids]), reference, rtol=1e-4, atol=1e-5)

    # Every trial's ranks were fed features, by a model that skipped the frozen prefix...
    fed = {p.name: json.loads(p.read_text()) for p in record.glob("inputs-*.json")}
    assert {n.split("-epoch")[0] for n in fed} == {"inputs-depth0", "inputs-depth1"}
    shapes = {4: [list(manifests[4][1]["shape"])], 5: [list(manifests[5][1]["shape"])]}
    for name, seen in fed.items():  # a rank may get no block of a small split (DDP's join covers it): shapes []
        frozen = 5 - int(name.split("depth")[1].split("-")[0])
        assert seen["input_blocks"] == frozen and seen["shapes"] in ([], shapes[frozen]), name
    assert all(fed[f"inputs-depth{d}-epoch1-rank0.json"]["shapes"] for d in (0, 1))
    # ... and each checkpoint is a model that takes images: its val accuracy on the decoded images is the one the
    # trial reported from the cached features, and its frozen blocks are still the pretrained ones.
    for row in rows:
        loaded = load_checkpoint(row["checkpoint"])
        assert loaded.model.input_blocks == 0
        metrics = engine.evaluate(loaded.model, engine.tensor_batches(images["image"], images["male"], 64))
        assert metrics["accuracy"] == pytest.approx(row["val_accuracy"], abs=1.5 / len(ids))
        frozen = loaded.model.block_bounds[loaded.model.frozen_blocks]
        for key, value in loaded.model.features[:frozen].state_dict().items():
            assert torch.equal(value, state[f"features.{key}"]), key
    assert best["checkpoint"] in {r["checkpoint"] for r in rows}

    # A second sweep or run under the same storage reuses the caches; other weights get caches of their own.
    before = {b: (tmp_path / "sweeps" / "feature_cache" / d.rsplit("/", 1)[1] / "_manifest.json").stat().st_mtime_ns
              for b, (d, _) in manifests.items()}
    messages = []
    assert ensure(config, root, [4, 5], log=messages.append) == {b: d for b, (d, _) in manifests.items()}
    assert messages == [f"[cache] reusing the features of the first 4, 5 conv block(s) from {root}"]
    assert before == {b: (tmp_path / "sweeps" / "feature_cache" / d.rsplit("/", 1)[1] / "_manifest.json"
                          ).stat().st_mtime_ns for b, (d, _) in manifests.items()}
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "other.pt")
    other = load_config(named_config_path("tiny"), [*overrides, f"model.weights={tmp_path / 'other.pt'}"])
    built = ensure(other, root, [5], log=messages.append)
    assert built[5] not in {d for d, _ in manifests.values()} and "computed" in messages[-1]
