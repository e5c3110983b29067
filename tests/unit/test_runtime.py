"""ONNX Runtime fp32 / int8 against torch fp32 (genderid.runtime, through the Predictor). No Ray."""
import numpy as np
import pytest
import torch

from genderid import engine, runtime
from genderid.checkpoint import load_checkpoint, save_checkpoint
from genderid.model import GenderNet
from genderid.predictor import Predictor
from genderid.preprocess import Preprocessing
from genderid.runtime import RuntimeSettingError, RuntimeSettings

SIZE = (32, 32)


def images(n, seed):
    """Noise faces whose class shows in the brightness of their upper half: a model can learn it in seconds."""
    rng = np.random.default_rng(seed)
    male = rng.integers(0, 2, n)
    x = rng.standard_normal((n, 3, *SIZE)).astype(np.float32)
    x[:, :, :16] += np.where(male == 1, 0.8, -0.8)[:, None, None, None]
    return x, male


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=5)
    x, male = images(512, 0)
    optimizer = engine.make_optimizer(model, "adam", 3e-3)
    for epoch in range(4):
        engine.train_one_epoch(model, engine.tensor_batches(x, male, 32, shuffle_seed=epoch), optimizer)
    folder = tmp_path_factory.mktemp("run") / "checkpoint_000001"
    save_checkpoint(str(folder), model, preprocessing=Preprocessing(image_size=SIZE))
    return str(folder)


def test_onnxruntime_fp32_matches_torch_and_int8_keeps_the_labels(checkpoint):
    val, male = images(400, 1)
    torch_predictor = Predictor.from_checkpoint(checkpoint)
    reference = torch_predictor.predict_arrays(val)
    assert np.mean([p.label == ("male" if m else "female") for p, m in zip(reference, male)]) > 0.9  # it learned

    fp32 = Predictor.from_checkpoint(checkpoint, runtime=RuntimeSettings("onnxruntime", "fp32"))
    answers = fp32.predict_arrays(val)
    assert max(abs(a.p_male - r.p_male) for a, r in zip(answers, reference)) < 1e-4
    assert [a.label for a in answers] == [r.label for r in reference]

    calibration = (batch for batch in np.split(images(256, 2)[0], 8))  # val-like images, not the scored ones
    int8 = Predictor.from_checkpoint(checkpoint, runtime=RuntimeSettings("onnxruntime", "int8"),
                                     calibration_batches=calibration)
    agree = np.mean([a.label == r.label for a, r in zip(int8.predict_arrays(val), reference)])
    assert agree >= 0.99
    assert int8.predict([]) == [] and len(int8.predict_arrays(val[:1])) == 1  # any batch size, 1 included


def test_exports_are_stored_beside_the_checkpoint_by_weights_and_reused(checkpoint, monkeypatch):
    loaded = load_checkpoint(checkpoint)
    fp32 = runtime.export_location(loaded.source, loaded.meta["weights_sha256"], RuntimeSettings("onnxruntime"))
    assert fp32.endswith(f"/exports/{loaded.meta['weights_sha256']}/onnxruntime-fp32.onnx")
    runtime.build(loaded, RuntimeSettings("onnxruntime", "fp32"))

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "export_fp32", no_second_export)
    assert runtime.build(loaded, RuntimeSettings("onnxruntime", "fp32"))  # read back, not rebuilt


def test_settings_that_cannot_run_are_refused_with_what_to_do(checkpoint, tmp_path):
    with pytest.raises(RuntimeSettingError, match="int8 runs on runtime onnxruntime"):
        RuntimeSettings("torch", "int8")
    with pytest.raises(RuntimeSettingError, match="runtime: must be one of torch, onnxruntime"):
        RuntimeSettings("tensorrt")
    torch.manual_seed(1)
    fresh = tmp_path / "run" / "checkpoint_000002"
    save_checkpoint(str(fresh), GenderNet(width=0.0625, batch_norm=True), preprocessing=Preprocessing(image_size=SIZE))
    with pytest.raises(RuntimeSettingError, match="genderid export"):  # int8 never built, nothing to calibrate on
        Predictor.from_checkpoint(str(fresh), runtime=RuntimeSettings("onnxruntime", "int8"))
