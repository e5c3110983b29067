"""The robustness report: accuracy per photo corruption and severity beside the clean figure. Pure PyTorch.

The batches come from :func:`genderid.batches.corrupted_batch` (Ray Data in ``genderid evaluate --robustness``):
each carries the ``corruption`` index and ``severity`` of its images, so one pass scores every corruption.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from genderid.corruptions import CORRUPTIONS, MAX_SEVERITY
from genderid.engine import Batch, StepOptions


@torch.no_grad()
def score(model: torch.nn.Module, batches: Iterable[Batch], options: StepOptions = StepOptions()) -> np.ndarray:
    """Counts ``[corruption, severity - 1, true label, predicted label]`` over every batch."""
    model.eval()
    counts = np.zeros((len(CORRUPTIONS), MAX_SEVERITY, 2, 2), dtype=np.int64)
    for batch in batches:
        with options.autocast():
            predicted = model(options.images(batch)).float().argmax(1).cpu().numpy()
        np.add.at(counts, (batch["corruption"].numpy(), batch["severity"].numpy() - 1, batch["male"].numpy(),
                           predicted), 1)
    return counts


def _accuracies(confusion: np.ndarray) -> tuple[float, float]:
    """Accuracy and balanced accuracy (mean recall over the classes present) of a 2x2 [true, predicted] table."""
    total = confusion.sum()
    accuracy = float(np.trace(confusion) / total) if total else float("nan")
    recalls = [confusion[c, c] / confusion[c].sum() for c in range(2) if confusion[c].sum()]
    return accuracy, float(np.mean(recalls)) if recalls else float("nan")


def report(counts: np.ndarray, clean: dict) -> dict:
    """The report's ``robustness`` block: per corruption its parameter, levels and accuracy per severity, the
    clean figures, and the corruptions ranked by their worst drop in accuracy."""
    block = {"clean": {"accuracy": clean["accuracy"], "balanced_accuracy": clean["balanced_accuracy"]},
             "severities": list(range(1, MAX_SEVERITY + 1)), "corruptions": {}}
    for index, spec in enumerate(CORRUPTIONS):
        figures = [_accuracies(counts[index, level]) for level in range(MAX_SEVERITY)]
        block["corruptions"][spec.name] = {
            "parameter": spec.parameter, "levels": list(spec.levels),
            "accuracy": [a for a, _ in figures], "balanced_accuracy": [b for _, b in figures],
            "count": int(counts[index, 0].sum()),
        }
    drops = {name: clean["accuracy"] - min(entry["accuracy"]) for name, entry in block["corruptions"].items()}
    block["worst"] = [{"corruption": name, "accuracy_drop_points": 100.0 * drop}
                      for name, drop in sorted(drops.items(), key=lambda item: -item[1])]
    mean = [float(np.mean([e["accuracy"][s] for e in block["corruptions"].values()])) for s in range(MAX_SEVERITY)]
    block["mean_accuracy_by_severity"] = mean
    return block
