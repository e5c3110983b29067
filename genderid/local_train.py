"""A plain single-process training loop over a prepared data set. Pure PyTorch, no Ray.

For small data: the whole split is read into memory once and decoded afresh each epoch (augmentation draws new
flips and crops every epoch, as Ray Data's decode does). It trains the recipe as Ray Train does (learning-rate
curve, label smoothing, mixup, weight average, through :func:`genderid.engine.train_recipe_epoch`): the recipe
``genderid train`` runs on one worker, its shuffling and augmentation draws aside. Tests use it for a trained
model without Ray; the recipe ablations in ``benchmarks/`` run its pieces epoch by epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from genderid import engine, shards
from genderid.celeba import ATTRIBUTES, SPLITS
from genderid.config import Config
from genderid.model import GenderNet, build_model
from genderid.preprocess import Preprocessing


@dataclass
class LocalRun:
    """What :func:`train_local` made: ``model`` is what the recipe validates and serves (the weight average, if
    the recipe keeps one)."""

    model: GenderNet
    preprocessing: Preprocessing
    history: list[dict] = field(default_factory=list)


def read_split(source: str, split: str) -> dict:
    """One split of a prepared data set, undecoded: ``image`` (JPEG bytes), ``male`` int64, ``attributes`` int8."""
    table = shards.read_table(source)
    rows = table.filter(np.asarray(table["split"]) == SPLITS[split])
    attributes = np.stack([np.asarray(rows[name], dtype=np.int8) for name in ATTRIBUTES], axis=1) \
        if rows.num_rows else np.zeros((0, len(ATTRIBUTES)), np.int8)
    return {"image": rows["image"].to_pylist(), "male": np.asarray(rows["male"], dtype=np.int64),
            "attributes": attributes}


def epoch_images(config: Config, preprocessing: Preprocessing, images: list, epoch: int) -> np.ndarray:
    """The train images of ``epoch``, preprocessed: with ``data.augment``, a fresh draw seeded by (seed, epoch)."""
    augment = np.random.default_rng([config.train.seed, epoch]) if config.data.augment else None
    return preprocessing.batch(images, augment)


def epoch_batches(config: Config, images: np.ndarray, male: np.ndarray, epoch: int,
                  attributes: Optional[np.ndarray] = None):
    """The train batches of ``epoch`` (with ``attributes`` rows, if given): a shuffle seeded by (seed, epoch),
    whole batches only."""
    return engine.tensor_batches(images, male, config.train.batch_size, attributes,
                                 shuffle_seed=config.train.seed * 1000 + epoch, drop_last=True)


def train_local(config: Config, source: str,
                on_epoch: Optional[Callable[[dict], None]] = None) -> LocalRun:
    """Train ``config.model`` on ``source``'s train split with ``config.train``'s recipe, validating every epoch.

    ``on_epoch`` is called with each epoch's row of the history (for progress).
    """
    torch.manual_seed(config.train.seed)
    preprocessing = Preprocessing.for_data(config.data)
    train = read_split(source, "train")
    val = read_split(source, "val")
    val_images = preprocessing.batch(val["image"])
    model = build_model(config.model)
    optimizer = engine.make_optimizer(model, config.train.optimizer, config.train.lr, config.train.weight_decay)
    average = engine.weight_average(model, config.train.weight_average_decay) \
        if config.train.weight_average_decay else None
    evaluated = average.module if average is not None else model
    steps = len(train["male"]) // config.train.batch_size
    run = LocalRun(model=evaluated, preprocessing=preprocessing)
    for epoch in range(1, config.train.epochs + 1):
        images = epoch_images(config, preprocessing, train["image"], epoch)
        stats = engine.train_recipe_epoch(model, epoch_batches(config, images, train["male"], epoch), optimizer,
                                          config.train, epoch, steps, average=average)
        val_metrics = engine.evaluate(evaluated, engine.tensor_batches(val_images, val["male"], 64))
        run.history.append({"epoch": epoch, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
                            "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
                            "images_per_s": stats["images_per_s"]})
        if on_epoch is not None:
            on_epoch(run.history[-1])
    return run
