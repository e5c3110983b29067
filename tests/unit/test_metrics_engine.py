import numpy as np
import pytest
import torch

from genderid import engine
from genderid.metrics import classification_metrics, largest_gaps, roc_auc
from genderid.model import GenderNet


def test_metrics_against_hand_computed_values():
    y_true = [1, 1, 1, 0, 0, 0, 0, 0]
    p_male = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4, 0.05]
    m = classification_metrics(y_true, p_male, loss=0.5)
    # predictions: 1 1 0 1 0 0 0 0 -> tp 2, fn 1, fp 1, tn 4
    assert m["confusion_matrix"] == [[4, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # positive/negative pairs ranked correctly: 0.9 and 0.8 beat all 5 negatives, 0.3 beats 3 of them.
    assert m["auc"] == pytest.approx((5 + 5 + 3) / 15)
    assert m["loss"] == 0.5 and m["count"] == 8


def test_auc_counts_ties_as_half_and_is_nan_for_one_class():
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0], [0.7, 0.5, 0.5]) == pytest.approx(0.75)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.9]))


def test_subgroup_accuracy_and_largest_gaps():
    y_true = np.array([1, 1, 0, 0])
    p_male = np.array([0.9, 0.1, 0.2, 0.3])  # the second image is wrong
    attributes = np.array([[1, 0], [1, 1], [0, 1], [0, 1]])
    m = classification_metrics(y_true, p_male, attributes=attributes, attribute_names=["Eyeglasses", "Smiling"])
    glasses = m["subgroups"]["Eyeglasses"]
    assert glasses["present"] == {"accuracy": 0.5, "count": 2} and glasses["absent"] == {"accuracy": 1.0, "count": 2}
    assert m["subgroups"]["Smiling"]["present"]["accuracy"] == pytest.approx(2 / 3)
    assert m["subgroups"]["Smiling"]["absent"] == {"accuracy": 1.0, "count": 1}
    assert [g["attribute"] for g in m["largest_gaps"]] == ["Eyeglasses", "Smiling"]


def test_predictions_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    model = GenderNet(width=0.0625, batch_norm=True).eval()
    images, male = rng.normal(size=(20, 3, 32, 32)).astype(np.float32), rng.integers(0, 2, 20)
    attributes = rng.integers(0, 2, (20, 40)).astype(np.int8)
    whole = engine.predict(model, engine.tensor_batches(images, male, 8, attributes))
    parts = [engine.predict(model, engine.tensor_batches(images[s], male[s], 8, attributes[s]))
             for s in (slice(0, 7), slice(7, 20))]
    merged = engine.Predictions.merge(parts)
    assert np.allclose(merged.p_male, whole.p_male, atol=1e-6) and merged.loss_sum == pytest.approx(whole.loss_sum)
    assert merged.metrics([f"a{i}" for i in range(40)])["accuracy"] == whole.metrics()["accuracy"]


def test_training_lowers_the_loss_and_only_moves_trainable_weights():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    male = rng.integers(0, 2, 64)
    images = (rng.normal(size=(64, 3, 32, 32)) + male[:, None, None, None] * 0.5).astype(np.float32)
    model = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=2)
    frozen_before = [p.clone() for p in model.block(0).parameters()]
    optimizer = engine.make_optimizer(model, "adam", 3e-3)
    losses = [engine.train_one_epoch(model, engine.tensor_batches(images, male, 16, shuffle_seed=e, drop_last=True),
                                     optimizer)["loss"] for e in range(6)]
    assert losses[-1] < losses[0] * 0.7
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, model.block(0).parameters()))
    assert len(optimizer.param_groups[0]["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_tensor_batches_cover_everything_once_or_drop_the_tail():
    male = np.arange(10)
    images = np.zeros((10, 3, 2, 2), np.float32)
    seen = np.concatenate([b["male"].numpy() for b in engine.tensor_batches(images, male, 4, shuffle_seed=1)])
    assert sorted(seen) == list(range(10))
    assert [len(b["male"]) for b in engine.tensor_batches(images, male, 4, drop_last=True)] == [4, 4]


def test_cosine_schedule_starts_at_the_base_rate_and_decays():
    rates = [engine.scheduled_lr(1e-3, "cosine", e, 8) for e in range(1, 9)]
    assert rates[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    assert engine.scheduled_lr(1e-3, "constant", 5, 8) == 1e-3


def test_early_stopping_rule_counts_epochs_without_a_lower_val_loss():
    state = {}
    decisions = [engine.early_stopping_update(state, loss, patience=2) for loss in (0.9, 0.7, 0.8, 0.6, 0.65, 0.7)]
    assert decisions == [False, False, False, False, False, True]
    assert state == {"best_val_loss": 0.6, "bad_epochs": 2}
    assert not any(engine.early_stopping_update({}, loss, patience=0) for loss in (1, 2, 3))


def test_largest_gaps_can_leave_out_attributes_with_few_images_on_a_side():
    subgroups = {"Rare": {"gap": 0.5, "present": {"accuracy": 0.5, "count": 4},
                          "absent": {"accuracy": 1.0, "count": 96}},
                 "Common": {"gap": 0.1, "present": {"accuracy": 0.9, "count": 50},
                            "absent": {"accuracy": 1.0, "count": 50}}}
    assert [g["attribute"] for g in largest_gaps(subgroups)] == ["Rare", "Common"]
    assert [g["attribute"] for g in largest_gaps(subgroups, min_count=30)] == ["Common"]
