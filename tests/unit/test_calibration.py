"""Temperature scaling, ECE and the uncertain band (pure numpy), and how checkpoints and the predictor carry them."""
import numpy as np
import pytest
import torch

from genderid.calibration import (Calibration, confidence_threshold, expected_calibration_error, fit_temperature,
                                  sigmoid)
from genderid.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from genderid.model import GenderNet
from genderid.predictor import Predictor
from genderid.preprocess import Preprocessing


def toy(n=20000, overconfidence=4.0, seed=0):
    """Labels drawn from sigmoid(z): a model whose margins are z * overconfidence is overconfident by that factor."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, n)
    y = (rng.random(n) < sigmoid(z)).astype(np.int64)
    return z * overconfidence, y


def test_the_fitted_temperature_undoes_a_known_overconfidence_and_ece_falls():
    margins, y = toy(overconfidence=4.0)
    temperature = fit_temperature(margins, y)
    assert temperature == pytest.approx(4.0, rel=0.08)
    before = expected_calibration_error(sigmoid(margins), y)
    after = expected_calibration_error(sigmoid(margins / temperature), y)
    assert before > 0.05 and after < 0.02 and after < before / 3
    # An underconfident model is sharpened the same way (T < 1), and a calibrated one is left alone.
    assert fit_temperature(*toy(overconfidence=0.5)) == pytest.approx(0.5, rel=0.08)
    assert fit_temperature(*toy(overconfidence=1.0)) == pytest.approx(1.0, rel=0.08)


def test_temperature_never_changes_a_label():
    margins, y = toy(overconfidence=3.0)
    calibration = Calibration.fit(margins, y, target_accuracy=0.95)
    assert np.array_equal(calibration.p_male(margins) >= 0.5, margins >= 0)


def test_the_band_is_the_smallest_that_lets_the_confident_predictions_reach_the_target():
    margins, y = toy(overconfidence=1.0, seed=1)
    calibration = Calibration.fit(margins, y, target_accuracy=0.97)
    p = calibration.p_male(margins)
    confident = ~calibration.uncertain(p)
    accuracy = np.mean((p[confident] >= 0.5) == y[confident])
    assert accuracy >= 0.97
    assert calibration.uncertain_share == pytest.approx(1 - confident.mean())
    assert 0.05 < calibration.uncertain_share < 0.9
    # Smallest: flagging one prediction fewer (lowering the threshold to the next confidence) misses the target.
    confidence = np.maximum(p, 1 - p)
    next_lower = confidence[confidence < calibration.confidence_threshold].max()
    wider = confidence >= next_lower
    assert np.mean((p[wider] >= 0.5) == y[wider]) < 0.97
    # A higher target flags more; a perfect model flags nothing; an impossible target flags everything but ties at 1.
    assert Calibration.fit(margins, y, 0.99).uncertain_share > calibration.uncertain_share
    assert confidence_threshold(np.array([0.9, 0.2, 0.6]), np.array([1, 0, 1]), 0.99) == 0.5
    assert confidence_threshold(np.array([0.9, 0.2]), np.array([0, 1]), 0.99) == 1.0


def test_calibration_from_a_checkpoint_is_validated():
    assert Calibration.from_dict(None) == Calibration.identity()
    fitted = Calibration.fit(*toy(2000), target_accuracy=0.95)
    assert Calibration.from_dict(fitted.to_dict()) == fitted
    for bad in ({"temperature": 0.0}, {"temperature": "1"}, {"confidence_threshold": 0.3}, {"surprise": 1}, [1]):
        with pytest.raises(ValueError):
            Calibration.from_dict(bad)


@pytest.fixture
def calibrated_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GenderNet(width=0.1, batch_norm=True, head_hidden=16).eval()
    calibration = Calibration(temperature=2.5, confidence_threshold=0.8, target_accuracy=0.99, fitted_on="val")
    path = save_checkpoint(tmp_path / "ckpt", model, preprocessing=Preprocessing(image_size=(32, 32)),
                           calibration=calibration)
    return path, model, calibration


def test_the_predictor_answers_calibrated_probabilities_and_the_uncertain_flag(calibrated_checkpoint):
    path, model, calibration = calibrated_checkpoint
    predictor = Predictor.from_checkpoint(str(path))
    assert predictor.calibration == calibration
    arrays = np.random.default_rng(0).normal(0, 3, (64, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(arrays)).double()
    expected = torch.sigmoid((logits[:, 1] - logits[:, 0]) / 2.5).numpy()
    predictions = predictor.predict_arrays(arrays)
    got = np.array([p.p_male for p in predictions])
    assert np.allclose(got, expected, atol=1e-6)
    assert [p.uncertain for p in predictions] == list(np.maximum(expected, 1 - expected) < 0.8)
    assert predictions[0].to_dict("v")["uncertain"] == predictions[0].uncertain


def test_a_checkpoint_with_a_broken_calibration_is_refused(calibrated_checkpoint):
    import json

    path = calibrated_checkpoint[0]
    meta = json.loads((path / "meta.json").read_text())
    meta["calibration"]["temperature"] = -1
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="calibration"):
        load_checkpoint(str(path))


def test_the_report_carries_ece_before_and_after_a_reliability_diagram_and_a_model_card(tmp_path):
    from genderid.engine import Predictions
    from genderid.evaluate import calibration_report
    from genderid.metrics import classification_metrics
    from genderid.report import write_report

    margins, y = toy(4000, overconfidence=4.0, seed=2)
    fitted = Calibration.fit(*toy(4000, overconfidence=4.0, seed=3), target_accuracy=0.95)  # "val"
    predictions = Predictions(y_true=y, p_male=sigmoid(margins), loss_sum=0.0, margins=margins)
    section = calibration_report(fitted, predictions)
    assert section["ece_after"] < section["ece_before"] / 3
    assert section["accuracy_confident"] >= 0.94 and 0 < section["uncertain_share"] < 1
    attributes = np.random.default_rng(0).integers(0, 2, (len(y), 2)).astype(np.int8)
    report = {"checkpoint": "ckpt", "model_version": "abc", "data": "data", "split": "test",
              **classification_metrics(y, sigmoid(margins), attributes=attributes,
                                       attribute_names=["Smiling", "Young"]),
              "calibration": section, "dataset": {"counts": {"test": {"total": len(y), "male": int(y.sum())}}},
              "model": {"architecture": {"width": 0.25}, "input_size": [108, 88], "val_metrics": {"val_accuracy": 0.9}}}
    files = write_report(tmp_path, report, ["female", "male"])
    assert {"reliability_diagram.png", "MODEL_CARD.md"} <= set(files)
    assert (tmp_path / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    card = (tmp_path / "MODEL_CARD.md").read_text()
    for expected in ("## Calibration", f"{section['ece_before']:.4f} before", f"{section['ece_after']:.4f} after",
                     "## Subgroups", "| Smiling |", "## Intended use", "## Limits", f"{report['accuracy']:.4f}"):
        assert expected in card
