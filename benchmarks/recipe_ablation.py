"""Ablations of the CPU recipe, each change on its own against the recipe as it is, in one process (not a test).

Model selection must not fit the split that is reported, so this runs on a data set prepared with
``genderid prepare --split selection``: every variant trains on its ``train`` split and is compared on its ``val``
split (a seeded 10% of the train identities); the ``test`` split (CelebA's official val and test identities) is
scored once per variant at the end and reported, never compared on.

The loop is the pure-PyTorch one (:mod:`genderid.local_train`'s epochs, the project's engine, model, preprocessing
and config; no Ray): the images are read once, decoded and augmented afresh every epoch, and each variant is a
list of dotted overrides of the recipe's config, exactly as ``genderid train`` would take them. Wall time here is
not the Ray run's: the recipe's 30 minutes are measured with ``genderid train`` itself.

    python benchmarks/recipe_ablation.py --data /tmp/subset-selection [--config cpu] [--variants base smoothing]

Prints one JSON line per variant as it finishes and a Markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genderid import engine, local_train, runtime  # noqa: E402
from genderid.celeba import ATTRIBUTES  # noqa: E402
from genderid.config import config_location, load_config  # noqa: E402
from genderid.metrics import largest_gaps  # noqa: E402
from genderid.model import build_model  # noqa: E402
from genderid.preprocess import Preprocessing  # noqa: E402

# Each change on its own, as overrides of the recipe (one line each: what it tries).
VARIANTS = {
    "base": [],
    "smoothing": ["train.label_smoothing=0.1"],
    "ema": ["train.weight_average_decay=0.995"],
    "warmup": ["train.warmup_epochs=1", "train.lr=0.002"],
    "jitter": ["data.jitter=0.3"],
    "small-input": ["data.image_size=[80, 64]", "train.epochs=14"],
    "epochs": ["train.epochs=12"],
    "mixup": ["train.mixup=0.2"],
    "erase": ["data.erase=0.5"],
    "blur": ["data.blur=0.3"],
    "seed": ["train.seed=1"],  # the recipe itself with another seed: how far two runs of one recipe land apart
}
# The variant with a weight average also scores the raw weights and these other decays of the same trajectory
# (averaging does not change training, so one run compares them all).
OTHER_DECAYS = (0.99, 0.995, 0.998)
MIN_SLICE = 30  # images on each side of an attribute for its gap to count (issue 16's worst-slice goal)


def worst_gap(subgroups: dict) -> tuple[str, float]:
    [worst] = largest_gaps(subgroups, top=1, min_count=MIN_SLICE)
    return worst["attribute"], worst["gap"]


class Averages:
    """Several weight averages of one trajectory, updated together (what ``train_one_epoch`` calls)."""

    def __init__(self, averages):
        self.averages = averages

    def update_parameters(self, model) -> None:
        for average in self.averages:
            average.update_parameters(model)


def run_variant(name: str, config_path: str, data: str, splits: dict) -> dict:
    config = load_config(config_path, [f"data.source={data}", *VARIANTS[name]])
    train = config.train
    torch.manual_seed(train.seed)
    preprocessing = Preprocessing.for_data(config.data)
    val = preprocessing.batch(splits["val"]["image"])
    model = build_model(config.model)
    optimizer = engine.make_optimizer(model, train.optimizer, train.lr, train.weight_decay)
    average = engine.weight_average(model, train.weight_average_decay) if train.weight_average_decay else None
    evaluated = average.module if average is not None else model
    others = {decay: engine.weight_average(model, decay) for decay in OTHER_DECAYS} if average is not None else {}
    compared = {"raw": model, **{f"decay {d}": a.module for d, a in others.items()}} if others else {}
    if others:
        average = Averages([average, *others.values()])
    steps = len(splits["train"]["male"]) // train.batch_size
    curve, started = [], time.perf_counter()
    for epoch in range(1, train.epochs + 1):
        images = local_train.epoch_images(config, preprocessing, splits["train"]["image"], epoch)
        batches = local_train.epoch_batches(config, images, splits["train"]["male"], epoch)
        stats = engine.train_recipe_epoch(model, batches, optimizer, train, epoch, steps, average=average)
        metrics = engine.evaluate(evaluated, engine.tensor_batches(val, splits["val"]["male"], 128))
        curve.append(round(metrics["accuracy"], 4))
        for label, other in compared.items():
            other_metrics = engine.evaluate(other, engine.tensor_batches(val, splits["val"]["male"], 128))
            print(f"  {name} epoch {epoch}: {label}: select acc {other_metrics['accuracy']:.4f}", flush=True)
        print(f"  {name} epoch {epoch}: train acc {stats['accuracy']:.4f}, select acc {metrics['accuracy']:.4f}, "
              f"{stats['images_per_s']:.0f} images/s", flush=True)
    seconds = time.perf_counter() - started
    return {"variant": name, "overrides": VARIANTS[name], "epochs": train.epochs, "seconds": round(seconds, 1),
            **final_scores(evaluated, preprocessing, splits, val), "select_curve": curve}


def final_scores(model, preprocessing, splits: dict, val_images=None) -> dict:
    """Accuracy, balanced accuracy and worst attribute gap on the selection (``val``) and reported (``test``)
    splits, and the accuracy with flip test-time augmentation (the predictor's ``flip_tta``), keyed as the
    results' JSON lines and table read them. ``val_images``: the val split preprocessed."""
    flipped = runtime.as_module(runtime.flip_averaged(runtime.torch_forward(model, torch.device("cpu"))))
    scores = {}
    for split, prefix in (("val", "select"), ("test", "test")):
        part = splits[split]
        images = val_images if split == "val" and val_images is not None else preprocessing.batch(part["image"])
        metrics = engine.evaluate(model, engine.tensor_batches(images, part["male"], 128, part["attributes"]),
                                  attribute_names=ATTRIBUTES)
        with_flip = engine.evaluate(flipped, engine.tensor_batches(images, part["male"], 128))
        scores.update({f"{prefix}_accuracy": round(metrics["accuracy"], 4),
                       f"{prefix}_balanced_accuracy": round(metrics["balanced_accuracy"], 4),
                       f"{prefix}_worst_gap": worst_gap(metrics["subgroups"]),
                       f"{prefix}_flip_accuracy": round(with_flip["accuracy"], 4)})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a data set prepared with --split selection")
    parser.add_argument("--config", default="cpu", help="the recipe: named config or YAML (default: cpu)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = {split: local_train.read_split(args.data, split) for split in ("train", "val", "test")}
    if not all(len(splits[split]["male"]) for split in splits):
        raise SystemExit(f"{args.data}: needs train, val and test rows (genderid prepare --split selection)")
    results = []
    for name in args.variants:
        results.append(run_variant(name, str(config_location(args.config)), args.data, splits))
        print(json.dumps(results[-1]), flush=True)
    print("\n| variant | overrides | epochs | seconds | selection val acc | balanced | worst gap (selection) "
          "| with flip TTA | reported split acc | balanced | worst gap (reported) | with flip TTA |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['variant']} | {' '.join(r['overrides']) or '-'} | {r['epochs']} | {r['seconds']:.0f} "
              f"| {r['select_accuracy']:.4f} | {r['select_balanced_accuracy']:.4f} "
              f"| {r['select_worst_gap'][0]} {100 * r['select_worst_gap'][1]:.1f} | {r['select_flip_accuracy']:.4f} "
              f"| {r['test_accuracy']:.4f} | {r['test_balanced_accuracy']:.4f} "
              f"| {r['test_worst_gap'][0]} {100 * r['test_worst_gap'][1]:.1f} | {r['test_flip_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
