"""`genderid demo`: the main job end to end on a small embedded default.

So far: synthetic CelebA-format data (or ``--celeba``) -> prepare on Ray Data -> a short single-process
training run of the ``tiny`` model -> a self-describing checkpoint -> predictions through the predictor.
Ray Train, Tune and Serve join this flow as they land.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from genderid import shards
from genderid.checkpoint import save_checkpoint
from genderid.config import load_config, named_config_path
from genderid.engine import evaluate, tensor_batches
from genderid.local_train import load_split, train_local
from genderid.predictor import Predictor


def run_demo(workdir: str = "runs/demo", celeba: Optional[str] = None, n: int = 800) -> dict:
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    if celeba is None:
        from genderid.synth import write_synthetic_celeba

        celeba = str(write_synthetic_celeba(workdir / "celeba-synthetic", n=n, seed=0, size=(64, 64)))
        print(f"[demo] synthetic CelebA-format data: {celeba}")
    from genderid.prepare import prepare

    data = str(workdir / "prepared")
    manifest = prepare(celeba, data)
    print(f"[demo] prepared {manifest['rows']} rows on Ray Data: {data}")
    config = load_config(named_config_path("tiny"), [f"data.source={data}", "train.epochs=4"])
    run = train_local(config, data)
    for row in run.history:
        print(f"[demo] epoch {row['epoch']}: train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}, "
              f"val accuracy {row['val_accuracy']:.3f}")
    test = load_split(data, "test", run.preprocessing)
    test_metrics = evaluate(run.model, tensor_batches(test["image"], test["male"], 64))
    checkpoint = save_checkpoint(workdir / "checkpoint", run.model, preprocessing=run.preprocessing,
                                 config=config.to_dict(), metrics=run.history[-1], epoch=len(run.history))
    predictor = Predictor.from_checkpoint(str(checkpoint))
    table = shards.read_table(data)
    sample = table.filter(table["split"].to_numpy() == 2).slice(0, 4)
    predictions = predictor.predict(sample["image"].to_pylist())
    summary = {
        "data": data, "checkpoint": str(checkpoint),
        "test_accuracy": test_metrics["accuracy"], "test_auc": test_metrics["auc"],
        "predictions": [{"image_id": i, "true": "male" if m else "female", **p.to_dict(predictor.model_version)}
                        for i, m, p in zip(sample["image_id"].to_pylist(), sample["male"].to_pylist(), predictions)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"[demo] done in {summary['seconds']} s; summary: {workdir / 'summary.json'}")
    return summary
