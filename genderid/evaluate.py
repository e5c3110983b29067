"""`genderid evaluate`: a checkpoint on one split of a prepared data set -> report.json + plots.

Ray Data decodes the split with the checkpoint's own preprocessing; the pass itself is the pure engine.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from genderid import progress, robustness, runtime, shards, storage
from genderid.calibration import Calibration, expected_calibration_error, reliability, sigmoid
from genderid.celeba import ATTRIBUTES
from genderid.checkpoint import load_checkpoint
from genderid.engine import Predictions, predict
from genderid.report import write_report
from genderid.runtime import RuntimeSettings

EVAL_BATCH_SIZE = 64


def default_split(source: str) -> str:
    """``test`` where the data set has test rows, else ``val`` (e.g. the CelebA subset has no test part)."""
    return "test" if shards.read_manifest(source)["counts"]["test"]["total"] else "val"


def calibration_report(calibration: Calibration, predictions: Predictions) -> dict:
    """ECE before and after the checkpoint's temperature on this split, its reliability bins, and the uncertain band's
    share and the accuracy of the predictions outside it."""
    before, after = sigmoid(predictions.margins), calibration.p_male(predictions.margins)
    uncertain = calibration.uncertain(after)
    confident = ~uncertain
    correct = (after >= 0.5).astype(np.int64) == predictions.y_true
    return {
        **calibration.to_dict(), "uncertain_band": calibration.band(),
        "fitted": {k: getattr(calibration, k) for k in ("count", "ece_before", "ece_after", "uncertain_share")},
        "ece_before": expected_calibration_error(before, predictions.y_true),
        "ece_after": expected_calibration_error(after, predictions.y_true),
        "uncertain_share": float(uncertain.mean()) if len(uncertain) else None,
        "accuracy_confident": float(correct[confident].mean()) if confident.any() else None,
        "reliability_before": reliability(before, predictions.y_true),
        "reliability_after": reliability(after, predictions.y_true),
    }


def runtime_comparison(predictions: Predictions, reference: Predictions) -> dict:
    """How a runtime's predictions differ from torch fp32's on the same images (in the same order)."""
    ours, theirs = predictions.p_male >= 0.5, reference.p_male >= 0.5
    accuracy = float(np.mean(ours == predictions.y_true))
    reference_accuracy = float(np.mean(theirs == reference.y_true))
    return {"accuracy": accuracy, "torch_fp32_accuracy": reference_accuracy,
            "accuracy_change_points": 100.0 * (accuracy - reference_accuracy),
            "labels_equal_to_torch_fp32": float(np.mean(ours == theirs)),
            "max_p_male_difference": float(np.max(np.abs(predictions.p_male - reference.p_male)))}


def model_summary(loaded) -> dict:
    """What the model card says about the model, from its checkpoint."""
    config = loaded.meta.get("config") or {}
    return {"architecture": loaded.meta.get("model"), "input_size": list(loaded.preprocessing.image_size),
            "epoch": loaded.meta.get("epoch"), "created": loaded.meta.get("created"),
            "val_metrics": {k: v for k, v in (loaded.meta.get("metrics") or {}).items() if k.startswith("val_")},
            "train": config.get("train"), "faces": loaded.preprocessing.faces.to_dict()}


def robustness_report(model, source: str, split: str, preprocessing, rows: int, clean: dict) -> dict:
    """Accuracy on ``split`` under each corruption and severity, from one Ray Data pass (see :mod:`robustness`)."""
    from genderid.corruptions import CORRUPTIONS, MAX_SEVERITY
    from genderid.ray_data import load_corrupted_split, torch_collate

    dataset = load_corrupted_split(source, split, preprocessing)
    images = rows * len(CORRUPTIONS) * MAX_SEVERITY
    batches = dataset.iter_torch_batches(batch_size=EVAL_BATCH_SIZE, collate_fn=torch_collate())
    counts = robustness.score(model, progress.track(batches, math.ceil(images / EVAL_BATCH_SIZE),
                                                    f"robustness {split}", "batches"))
    return robustness.report(counts, clean)


def evaluate_checkpoint(checkpoint: str, source: str, out: str, split: str = "test",
                        settings: RuntimeSettings = RuntimeSettings(), robustness: bool = False,
                        flip_tta: bool = False) -> dict:
    """Evaluate ``checkpoint`` on ``split`` of ``source``; write the report to ``out`` (path or s3://).

    ``settings``: the runtime that runs the model (an int8 model is built from ``source``'s val images when it
    does not exist yet); other than torch fp32, the report's ``runtime`` block compares it with torch fp32 on the
    same images (as it does with ``flip_tta``, the mirror-image average). ``robustness``: also score the split
    under every photo corruption at every severity (:mod:`genderid.robustness`; the report's ``robustness`` block
    and ``robustness.png``).
    """
    from genderid.ray_data import load_split, torch_collate
    from genderid.ray_runtime import init_ray

    manifest = shards.read_manifest(source)
    counts = manifest["counts"]
    if not counts[split]["total"]:
        raise shards.DatasetError(f"{source}: the {split} split has no rows; choose another with --split")
    loaded = load_checkpoint(checkpoint)
    calibration = runtime.val_batches(source, loaded.preprocessing) if settings.precision == "int8" else None
    forward = runtime.forward_for(loaded, settings, calibration_batches=calibration)
    model = runtime.as_module(runtime.flip_averaged(forward) if flip_tta else forward)
    compared = settings != RuntimeSettings() or flip_tta
    init_ray()
    dataset = load_split(source, split, loaded.preprocessing, keep_attributes=True)
    if compared:  # two passes compared image by image: the same order both times
        dataset.context.execution_options.preserve_order = True

    def run(model_to_run, label: str) -> Predictions:
        batches = dataset.iter_torch_batches(batch_size=EVAL_BATCH_SIZE, collate_fn=torch_collate())
        return predict(model_to_run, progress.track(batches, math.ceil(counts[split]["total"] / EVAL_BATCH_SIZE),
                                                    label, "batches"))

    predictions = run(model, f"evaluate {split}")
    metrics = predictions.metrics(ATTRIBUTES)
    report = {"checkpoint": loaded.source, "model_version": loaded.version, "data": source, "split": split,
              **metrics, "calibration": calibration_report(loaded.calibration, predictions),
              "model": model_summary(loaded), "dataset": {"counts": counts, "split_recipe": manifest.get("split"),
                                                          "aligned": manifest.get("aligned")},
              "runtime": {"runtime": settings.runtime, "precision": settings.precision, "flip_tta": flip_tta}}
    if compared:
        reference = run(loaded.model, f"evaluate {split} (torch fp32)")
        report["runtime"].update(runtime_comparison(predictions, reference))
    if robustness:
        report["robustness"] = robustness_report(model, source, split, loaded.preprocessing, counts[split]["total"],
                                                 metrics)
    with tempfile.TemporaryDirectory() as directory:
        write_report(Path(directory), report, loaded.labels, loaded.meta.get("history"))
        storage.upload_dir(directory, out)
    return report
