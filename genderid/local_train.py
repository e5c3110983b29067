"""A plain single-process training loop over a prepared data set. Pure PyTorch, no Ray.

For small data: the whole data set is decoded into memory once. It is the baseline that the Ray Train
benchmark is measured against, and what the offline demo runs before Ray Train exists in it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from genderid import engine, shards
from genderid.batches import to_model_batch
from genderid.celeba import SPLITS
from genderid.config import Config
from genderid.model import GenderNet, build_model
from genderid.preprocess import Preprocessing


@dataclass
class LocalRun:
    model: GenderNet
    preprocessing: Preprocessing
    history: list[dict] = field(default_factory=list)


def load_split(source: str, split: str, preprocessing: Preprocessing) -> dict[str, np.ndarray]:
    """Decode one split of a prepared data set into model-ready arrays (eval preprocessing)."""
    table = shards.read_table(source)
    rows = table.filter(np.asarray(table["split"]) == SPLITS[split])
    return to_model_batch({name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names},
                          preprocessing)


def train_local(config: Config, source: str) -> LocalRun:
    """Train ``config.model`` on ``source``'s train split for ``config.train.epochs``, validating every epoch."""
    torch.manual_seed(config.train.seed)
    preprocessing = Preprocessing.for_data(config.data)
    train, val = load_split(source, "train", preprocessing), load_split(source, "val", preprocessing)
    model = build_model(config.model)
    optimizer = engine.make_optimizer(model, config.train.optimizer, config.train.lr, config.train.weight_decay)
    run = LocalRun(model=model, preprocessing=preprocessing)
    for epoch in range(1, config.train.epochs + 1):
        batches = engine.tensor_batches(train["image"], train["male"], config.train.batch_size,
                                        shuffle_seed=config.train.seed + epoch, drop_last=True)
        stats = engine.train_one_epoch(model, batches, optimizer)
        val_metrics = engine.evaluate(model, engine.tensor_batches(val["image"], val["male"], 64))
        run.history.append({"epoch": epoch, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"],
                            "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
                            "images_per_s": stats["images_per_s"]})
    return run
