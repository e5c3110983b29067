"""`genderid evaluate`: a checkpoint on one split of a prepared data set -> report.json + plots.

Ray Data decodes the split with the checkpoint's own preprocessing; the pass itself is the pure engine.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from genderid import shards, storage
from genderid.celeba import ATTRIBUTES
from genderid.checkpoint import load_checkpoint
from genderid.engine import predict
from genderid.report import write_report


def default_split(source: str) -> str:
    """``test`` where the data set has test rows, else ``val`` (e.g. the CelebA subset has no test part)."""
    return "test" if shards.read_manifest(source)["counts"]["test"]["total"] else "val"


def evaluate_checkpoint(checkpoint: str, source: str, out: str, split: str = "test") -> dict:
    """Evaluate ``checkpoint`` on ``split`` of ``source``; write the report to ``out`` (path or s3://)."""
    from genderid.ray_data import load_split, torch_collate
    from genderid.ray_runtime import init_ray

    counts = shards.read_manifest(source)["counts"]
    if not counts[split]["total"]:
        raise shards.DatasetError(f"{source}: the {split} split has no rows; choose another with --split")
    loaded = load_checkpoint(checkpoint)
    init_ray()
    dataset = load_split(source, split, loaded.preprocessing, keep_attributes=True)
    predictions = predict(loaded.model, dataset.iter_torch_batches(batch_size=64, collate_fn=torch_collate()))
    metrics = predictions.metrics(ATTRIBUTES)
    report = {"checkpoint": loaded.source, "model_version": loaded.version, "data": source, "split": split,
              **metrics}
    with tempfile.TemporaryDirectory() as directory:
        write_report(Path(directory), report, loaded.labels, loaded.meta.get("history"))
        storage.upload_dir(directory, out)
    return report
