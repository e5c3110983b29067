"""Classification metrics from labels and ``p_male`` scores. Pure numpy.

Metrics are computed from the full arrays (gathered across workers when training is distributed), never
averaged from per-worker metrics, so distributed and single-process evaluation agree exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]``: rows are the true class (0 female, 1 male), columns the predicted one."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    matrix = np.zeros((2, 2), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix.tolist()


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of the per-class recalls over the classes present in ``y_true``."""
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in (0, 1) if np.any(y_true == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with only one class."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(np.sum(y_true == 1))
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):  # average ranks over runs of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def subgroup_accuracy(y_true: np.ndarray, y_pred: np.ndarray, attributes: np.ndarray,
                      names: Sequence[str]) -> dict[str, dict]:
    """For each attribute: accuracy (and count) where it is present and where it is absent, and the gap."""
    correct = np.asarray(y_true) == np.asarray(y_pred)
    result = {}
    for column, name in enumerate(names):
        present = np.asarray(attributes)[:, column] == 1
        entry = {}
        for key, mask in (("present", present), ("absent", ~present)):
            count = int(mask.sum())
            entry[key] = {"accuracy": float(correct[mask].mean()) if count else None, "count": count}
        a, b = entry["present"]["accuracy"], entry["absent"]["accuracy"]
        entry["gap"] = abs(a - b) if a is not None and b is not None else None
        result[name] = entry
    return result


def largest_gaps(subgroups: dict[str, dict], top: int = 5, min_count: int = 0) -> list[dict]:
    """The ``top`` attributes with the largest present/absent accuracy gap, among those with at least
    ``min_count`` images on each side."""
    rows = [{"attribute": name, "gap": entry["gap"], "present": entry["present"]["accuracy"],
             "absent": entry["absent"]["accuracy"]} for name, entry in subgroups.items()
            if entry["gap"] is not None and min(entry["present"]["count"], entry["absent"]["count"]) >= min_count]
    return sorted(rows, key=lambda r: r["gap"], reverse=True)[:top]


def classification_metrics(y_true: Sequence[int], p_male: Sequence[float], loss: Optional[float] = None,
                           attributes: Optional[np.ndarray] = None, attribute_names: Sequence[str] = (),
                           threshold: float = 0.5) -> dict:
    """Loss, accuracy, balanced accuracy, ROC AUC, confusion matrix and (with attributes) subgroup accuracy."""
    y_true = np.asarray(y_true, dtype=np.int64)
    p_male = np.asarray(p_male, dtype=np.float64)
    y_pred = (p_male >= threshold).astype(np.int64)
    metrics = {
        "count": int(len(y_true)),
        "accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else float("nan"),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "auc": roc_auc(y_true, p_male),
        "confusion_matrix": confusion_matrix(y_true, y_pred),
    }
    if loss is not None:
        metrics["loss"] = float(loss)
    if attributes is not None and len(attribute_names):
        metrics["subgroups"] = subgroup_accuracy(y_true, y_pred, attributes, attribute_names)
        metrics["largest_gaps"] = largest_gaps(metrics["subgroups"])
    return metrics
