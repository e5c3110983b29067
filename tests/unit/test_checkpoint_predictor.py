import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from genderid.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from genderid.model import GenderNet
from genderid.predictor import Predictor
from genderid.preprocess import Preprocessing


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GenderNet(width=0.1, batch_norm=True, unfreeze_depth=3, head_hidden=16).eval()
    model(torch.randn(4, 3, 32, 32))  # non-default BatchNorm statistics must survive too
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    path = save_checkpoint(tmp_path / "ckpt", model, preprocessing=Preprocessing(image_size=(32, 32)),
                           config={"model": {"width": 0.1}}, metrics={"val_accuracy": 0.9}, epoch=3,
                           train_state={"optimizer": optimizer.state_dict(), "epoch": 3})
    return path, model


def jpeg(colour, size=(40, 48)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_round_trip_rebuilds_the_same_model(checkpoint):
    path, model = checkpoint
    loaded = load_checkpoint(str(path), with_train_state=True)
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(loaded.model(x), model.eval()(x))
    assert loaded.model.unfreeze_depth == 3
    assert loaded.preprocessing == Preprocessing(image_size=(32, 32))
    assert loaded.labels == ["female", "male"] and loaded.meta["epoch"] == 3
    assert loaded.meta["metrics"] == {"val_accuracy": 0.9} and loaded.meta["config"]["model"]["width"] == 0.1
    assert loaded.train_state["epoch"] == 3 and "state" in loaded.train_state["optimizer"]
    assert len(loaded.version) == 12


def test_tampered_weights_are_refused(checkpoint):
    path, _ = checkpoint
    weights = path / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(str(path))


def test_tampered_train_state_is_refused(checkpoint):
    path, _ = checkpoint
    (path / "train_state.pt").write_bytes(b"x" + (path / "train_state.pt").read_bytes())
    load_checkpoint(str(path))  # the model alone still loads
    with pytest.raises(CheckpointError, match="train state"):
        load_checkpoint(str(path), with_train_state=True)


def test_missing_and_unfinished_checkpoints(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope"))
    path, _ = checkpoint
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json not found"):
        load_checkpoint(str(path))


def test_best_json_pointer(tmp_path, checkpoint):
    path, _ = checkpoint
    pointer = tmp_path / "best.json"
    pointer.write_text(json.dumps({"checkpoint": str(path), "metrics": {}, "config": {}}))
    assert read_meta(str(pointer))["epoch"] == 3
    assert load_checkpoint(str(pointer)).source == str(path)
    pointer.write_text("{}")
    with pytest.raises(CheckpointError, match="needs a 'checkpoint' key"):
        load_checkpoint(str(pointer))


def test_predictor_takes_bytes_and_pil_images_in_batches(checkpoint):
    path, model = checkpoint
    predictor = Predictor.from_checkpoint(str(path), batch_size=2)
    images = [jpeg("white"), Image.new("L", (30, 30), 20), jpeg("red"), jpeg((0, 90, 200))]
    predictions = predictor.predict(images)
    assert len(predictions) == 4
    expected = torch.softmax(model.eval()(torch.from_numpy(predictor.preprocess(images))), 1)[:, 1].detach().numpy()
    assert np.allclose([p.p_male for p in predictions], expected, atol=1e-5)
    assert all(p.label == ("male" if p.p_male >= 0.5 else "female") for p in predictions)
    assert predictions[0].to_dict("v1")["model_version"] == "v1"


def _saved(tmp_path, name="ckpt", seed=0):
    torch.manual_seed(seed)
    model = GenderNet(width=0.0625, batch_norm=True).eval()
    return save_checkpoint(tmp_path / name, model, preprocessing=Preprocessing(image_size=(32, 32)))


@pytest.mark.parametrize("field, value, message", [
    ("weights_file", "../../outside.pt", "weights_file must be 'model.pt'"),
    ("labels", ["cat", "dog"], "labels must be"),
    ("preprocessing", {"image_size": [32, 10**6]}, "invalid preprocessing"),
    ("preprocessing", {"image_size": [32, 32], "mean": [0.5], "std": [1, 1, 1]}, "invalid preprocessing"),
    ("weights_sha256", "not-a-hash", "weights_sha256 must be 64"),
    ("model", {"width": 0.0625, "layers": 99}, "invalid model description"),
])
def test_a_tampered_meta_json_is_refused_with_a_message_naming_the_field(tmp_path, field, value, message):
    import json

    from genderid.checkpoint import CheckpointError, load_checkpoint

    directory = _saved(tmp_path)
    meta = json.loads((directory / "meta.json").read_text())
    meta[field] = value
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(directory))


def test_files_are_read_by_their_fixed_names_with_a_size_limit(tmp_path, monkeypatch):
    from genderid import checkpoint

    directory = _saved(tmp_path)
    monkeypatch.setattr(checkpoint, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(checkpoint.CheckpointError, match=r"weights file is [\d,]+ bytes; the limit is 1,000"):
        checkpoint.load_checkpoint(str(directory))


def test_a_pinned_checkpoint_survives_best_json_being_rewritten_and_a_wrong_pin_is_refused(tmp_path):
    import json

    from genderid.checkpoint import CheckpointError, load_checkpoint, pin

    first, second = _saved(tmp_path, "first", seed=1), _saved(tmp_path, "second", seed=2)
    pointer = tmp_path / "best.json"
    pointer.write_text(json.dumps({"checkpoint": str(first)}))
    concrete, sha = pin(str(pointer))  # what the Serve app builder hands its replicas
    pointer.write_text(json.dumps({"checkpoint": str(second)}))  # a retrain rewrites best.json
    assert concrete == str(first) and load_checkpoint(concrete, expected_sha256=sha).version == sha[:12]
    assert load_checkpoint(str(pointer)).version != sha[:12]
    with pytest.raises(CheckpointError, match="pinned"):
        pin(str(pointer), expected_sha256=sha)
    with pytest.raises(CheckpointError, match="not the expected"):
        load_checkpoint(str(second), expected_sha256=sha)


def test_flip_tta_averages_each_image_with_its_mirror_image(checkpoint):
    from genderid.runtime import flip_averaged

    def left_minus_right(batch):  # a "model" that tells mirror images apart
        left, right = batch[..., :16].mean(axis=(1, 2, 3)), batch[..., 16:].mean(axis=(1, 2, 3))
        return np.stack([right - left, left - right], axis=1)

    arrays = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    mirrored = np.ascontiguousarray(arrays[..., ::-1])
    assert np.abs(left_minus_right(arrays) - left_minus_right(mirrored)).max() > 0.01
    averaged = flip_averaged(left_minus_right)
    assert np.allclose(averaged(arrays), (left_minus_right(arrays) + left_minus_right(mirrored)) / 2)
    assert np.allclose(averaged(arrays), 0.0, atol=1e-6)  # this model's mirror pair cancels out exactly

    path, model = checkpoint  # the predictor runs the model on the image and its mirror image
    tta = Predictor.from_checkpoint(str(path), flip_tta=True)
    with torch.no_grad():
        logits = (model.eval()(torch.from_numpy(arrays)) + model(torch.from_numpy(mirrored))) / 2
    p_tta = np.array([p.p_male for p in tta.predict_arrays(arrays)])
    assert np.allclose(p_tta, torch.softmax(logits, 1)[:, 1].numpy(), atol=1e-6)
    assert np.allclose(p_tta, [p.p_male for p in tta.predict_arrays(mirrored)], atol=1e-6)
