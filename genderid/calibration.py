"""Temperature scaling, expected calibration error and the "uncertain" band. Pure numpy.

The model's two logits reduce to one margin ``z = logit_male - logit_female`` and ``p_male = sigmoid(z)``.
Temperature scaling (Guo et al., 2017) divides the margin by one scalar ``T`` fitted on the val split by
maximum likelihood; it never changes a label, only how sure the model says it is. The uncertain band is then
chosen on the same calibrated val predictions: the smallest confidence ``max(p, 1 - p)`` above which the
predictions reach ``target_accuracy``. Predictions below it are flagged ``uncertain``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

# Searched range of the temperature: beyond it a model is broken, not miscalibrated.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
ECE_BINS = 15


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def nll(margins: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under ``sigmoid(margin / T)`` (numerically stable)."""
    z = np.asarray(margins, dtype=np.float64) / temperature
    signed = np.where(np.asarray(y_true) == 1, z, -z)
    return float(np.mean(np.logaddexp(0.0, -signed))) if len(signed) else float("nan")


def fit_temperature(margins: np.ndarray, y_true: np.ndarray, iterations: int = 80) -> float:
    """The ``T`` minimising :func:`nll` (golden-section search on ``log T``; the NLL is unimodal in it)."""
    margins, y_true = np.asarray(margins, dtype=np.float64), np.asarray(y_true)
    if len(margins) == 0 or len(np.unique(y_true)) < 2 or not np.all(np.isfinite(margins)):
        return 1.0
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(margins, y_true, math.exp(a)), nll(margins, y_true, math.exp(b))
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(margins, y_true, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(margins, y_true, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def reliability(p_male: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin over [0.5, 1]: how many predictions, their mean confidence and their accuracy."""
    p_male, y_true = np.asarray(p_male, dtype=np.float64), np.asarray(y_true)
    confidence = np.maximum(p_male, 1.0 - p_male)
    correct = (p_male >= 0.5).astype(np.int64) == y_true
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "confidence": float(confidence[mask].mean()) if count else None,
                     "accuracy": float(correct[mask].mean()) if count else None})
    return rows


def expected_calibration_error(p_male: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    rows = reliability(p_male, y_true, bins)
    total = sum(r["count"] for r in rows)
    if not total:
        return float("nan")
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]) / total)


def confidence_threshold(p_male: np.ndarray, y_true: np.ndarray, target_accuracy: float) -> float:
    """The smallest confidence ``c`` such that the predictions with ``max(p, 1-p) >= c`` reach ``target_accuracy``.

    0.5 when all of them already do (no band); 1.0 when no confident subset does (everything uncertain).
    """
    p_male, y_true = np.asarray(p_male, dtype=np.float64), np.asarray(y_true)
    if len(p_male) == 0:
        return 1.0
    confidence = np.maximum(p_male, 1.0 - p_male)
    correct = ((p_male >= 0.5).astype(np.int64) == y_true).astype(np.float64)
    order = np.argsort(-confidence, kind="mergesort")
    confidence, correct = confidence[order], correct[order]
    accuracy_of_top = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    # Only cut between distinct confidences: tied predictions are all flagged or none is.
    last_of_run = np.append(confidence[1:] < confidence[:-1], True)
    ok = np.flatnonzero((accuracy_of_top >= target_accuracy) & last_of_run)
    if len(ok) == 0:
        return 1.0
    k = ok[-1]  # the largest confident set that reaches the target
    return 0.5 if k == len(confidence) - 1 else float(confidence[k])


@dataclass(frozen=True)
class Calibration:
    """What a checkpoint stores about its probabilities; :meth:`identity` for checkpoints without it."""

    temperature: float = 1.0
    confidence_threshold: float = 0.5  # max(p, 1-p) below this -> uncertain
    target_accuracy: Optional[float] = None
    fitted_on: Optional[str] = None  # "val" when fitted by training
    count: int = 0
    ece_before: Optional[float] = None
    ece_after: Optional[float] = None
    uncertain_share: Optional[float] = None  # of the split it was fitted on

    @classmethod
    def identity(cls) -> "Calibration":
        return cls()

    @classmethod
    def fit(cls, margins: np.ndarray, y_true: np.ndarray, target_accuracy: float, split: str = "val") -> "Calibration":
        """Fit the temperature, then the band on the calibrated predictions, from one split's margins and labels."""
        margins, y_true = np.asarray(margins, dtype=np.float64), np.asarray(y_true)
        temperature = fit_temperature(margins, y_true)
        before, after = sigmoid(margins), sigmoid(margins / temperature)
        threshold = confidence_threshold(after, y_true, target_accuracy)
        confidence = np.maximum(after, 1.0 - after)
        return cls(temperature=temperature, confidence_threshold=threshold, target_accuracy=target_accuracy,
                   fitted_on=split, count=int(len(y_true)),
                   ece_before=expected_calibration_error(before, y_true),
                   ece_after=expected_calibration_error(after, y_true),
                   uncertain_share=float(np.mean(confidence < threshold)) if len(y_true) else None)

    def p_male(self, margins: np.ndarray) -> np.ndarray:
        """Calibrated ``p_male`` from margins (``logit_male - logit_female``)."""
        return sigmoid(np.asarray(margins, dtype=np.float64) / self.temperature)

    def uncertain(self, p_male: np.ndarray) -> np.ndarray:
        """True where a calibrated ``p_male`` lies inside the band."""
        p_male = np.asarray(p_male, dtype=np.float64)
        return np.maximum(p_male, 1.0 - p_male) < self.confidence_threshold

    def band(self) -> list[float]:
        """The uncertain band as ``[low, high]`` of ``p_male``."""
        return [1.0 - self.confidence_threshold, self.confidence_threshold]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values, where: str = "calibration") -> "Calibration":
        """Validated (a checkpoint's ``meta.json`` is untrusted)."""
        if values is None:
            return cls.identity()
        if not isinstance(values, dict) or set(values) - set(cls.__dataclass_fields__):
            raise ValueError(f"{where} must be a mapping with keys {sorted(cls.__dataclass_fields__)}, got {values!r}")
        calibration = cls(**values)
        t, c = calibration.temperature, calibration.confidence_threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise ValueError(f"{where}.temperature must be a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                             f"got {t!r}")
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not 0.5 <= c <= 1.0:
            raise ValueError(f"{where}.confidence_threshold must be a number in [0.5, 1], got {c!r}")
        return calibration
