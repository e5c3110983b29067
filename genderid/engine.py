"""Train one epoch / evaluate over any iterable of batches. Pure PyTorch.

A batch is a mapping with ``image`` (float NCHW), ``male`` (int labels) and optionally ``attributes``
(int [N, 40]): what Ray Data's ``iter_torch_batches`` yields, and what :func:`tensor_batches` makes from plain
arrays in tests, benchmarks and local runs.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from genderid.metrics import classification_metrics
from genderid.model import trainable_parameters

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class StepOptions:
    """How tensors meet the device: bf16 autocast and channels_last are for GPUs."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device) -> "StepOptions":
        on_gpu = device.type == "cuda"
        return cls(device=device, autocast_dtype=torch.bfloat16 if on_gpu else None, channels_last=on_gpu)

    def images(self, batch: Batch) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return batch["image"].to(self.device, non_blocking=True, memory_format=memory_format)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters only (frozen blocks carry no optimizer state)."""
    params = trainable_parameters(model)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r} (adam, adamw, sgd)")


def scheduled_lr(base_lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """Learning rate of 1-based ``epoch``; derived from the epoch alone, so a resumed run continues the curve."""
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / max(epochs, 1)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant, cosine)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def early_stopping_update(state: dict, val_loss: float, patience: int) -> bool:
    """Apply the seed study's rule to ``state`` (``best_val_loss``, ``bad_epochs``); True when training should stop.

    Stop after ``patience`` epochs in a row without a lower validation loss; ``patience`` 0 never stops.
    """
    if state.get("best_val_loss") is None or val_loss < state["best_val_loss"]:
        state["best_val_loss"], state["bad_epochs"] = val_loss, 0
    else:
        state["bad_epochs"] = state.get("bad_epochs", 0) + 1
    return bool(patience) and state["bad_epochs"] >= patience


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    options: StepOptions = StepOptions(), max_steps: Optional[int] = None) -> dict:
    """One pass of SGD steps; returns train loss, accuracy, images, seconds and images/s of this process."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        labels = batch["male"].to(options.device, non_blocking=True).long()
        if labels.shape[0] < 2:  # BatchNorm cannot train on one example (a shard's last, odd batch)
            continue
        images = options.images(batch)
        with options.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.shape[0]
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == labels).sum())
        seen += n
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen,
            "seconds": seconds, "images_per_s": seen / seconds if seconds > 0 else 0.0}


@dataclass
class Predictions:
    """Labels, scores and summed loss of an evaluation pass; mergeable across workers."""

    y_true: np.ndarray
    p_male: np.ndarray
    loss_sum: float
    attributes: Optional[np.ndarray] = None
    margins: Optional[np.ndarray] = None  # logit_male - logit_female: what calibration is fitted on

    @classmethod
    def merge(cls, parts: Sequence["Predictions"]) -> "Predictions":
        attributes = [p.attributes for p in parts]
        margins = [p.margins for p in parts]
        return cls(
            y_true=np.concatenate([p.y_true for p in parts]), p_male=np.concatenate([p.p_male for p in parts]),
            loss_sum=float(sum(p.loss_sum for p in parts)),
            attributes=None if any(a is None for a in attributes) else np.concatenate(attributes),
            margins=None if any(m is None for m in margins) else np.concatenate(margins),
        )

    def metrics(self, attribute_names: Sequence[str] = ()) -> dict:
        loss = self.loss_sum / len(self.y_true) if len(self.y_true) else float("nan")
        return classification_metrics(self.y_true, self.p_male, loss=loss, attributes=self.attributes,
                                       attribute_names=attribute_names if self.attributes is not None else ())


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], options: StepOptions = StepOptions()) -> Predictions:
    """Run the model in eval mode over every batch."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    y_true, p_male, margins, attributes, loss_sum = [], [], [], [], 0.0
    for batch in batches:
        labels = batch["male"].to(options.device).long()
        with options.autocast():
            logits = model(options.images(batch)).float()
        loss_sum += float(loss_fn(logits, labels))
        y_true.append(labels.cpu().numpy())
        p_male.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
        margins.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
        if "attributes" in batch:
            attributes.append(np.asarray(batch["attributes"].cpu().numpy(), dtype=np.int8))
    empty = np.zeros(0, dtype=np.int64)
    return Predictions(
        y_true=np.concatenate(y_true) if y_true else empty,
        p_male=np.concatenate(p_male) if p_male else empty.astype(np.float64),
        loss_sum=loss_sum,
        attributes=np.concatenate(attributes) if attributes else None,
        margins=np.concatenate(margins) if margins else empty.astype(np.float64),
    )


def evaluate(model: nn.Module, batches: Iterable[Batch], options: StepOptions = StepOptions(),
             attribute_names: Sequence[str] = ()) -> dict:
    """Metrics of the model over every batch (see :func:`genderid.metrics.classification_metrics`)."""
    return predict(model, batches, options).metrics(attribute_names)


def tensor_batches(images: np.ndarray, male: np.ndarray, batch_size: int, attributes: Optional[np.ndarray] = None,
                   shuffle_seed: Optional[int] = None, drop_last: bool = False) -> Iterator[dict]:
    """Batches of tensors from in-memory arrays (images already preprocessed, NCHW float32)."""
    order = np.arange(len(male))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(order)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        batch = {"image": torch.from_numpy(images[index]), "male": torch.from_numpy(np.asarray(male)[index])}
        if attributes is not None:
            batch["attributes"] = torch.from_numpy(np.asarray(attributes)[index])
        yield batch
