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
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

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


def scheduled_lr(base_lr: float, schedule: str, epoch: float, epochs: int, warmup_epochs: float = 0.0) -> float:
    """Learning rate at 1-based ``epoch``; a fraction (``epoch`` 3.5: half-way through the third epoch's steps)
    gives the per-step curve. Derived from the position alone, so a resumed run continues the curve.

    ``warmup_epochs``: the rate rises linearly from ``base_lr / (warmup steps)`` to ``base_lr`` over that many
    epochs, then follows ``schedule`` over the rest (cosine decays to 0 at the end of ``epochs``).
    """
    position = epoch - 1  # epochs completed before this step
    if warmup_epochs > 0 and position < warmup_epochs:
        return base_lr * max(position, 1e-3 * warmup_epochs) / warmup_epochs
    if schedule == "constant":
        return base_lr
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-9)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(position - warmup_epochs, span) / span))
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant, cosine)")


def epoch_lr_curve(train, epoch: int, steps_per_epoch: int) -> tuple[float, Optional[Callable[[int], float]]]:
    """The rate at the start of ``epoch``, and with a warm-up the per-step curve through it.

    ``train``: a :class:`genderid.config.TrainConfig` (lr, lr_schedule, epochs, warmup_epochs). Without a warm-up
    the rate is set once per epoch, as the recipes before warm-up existed were trained.
    """
    start = scheduled_lr(train.lr, train.lr_schedule, epoch, train.epochs, train.warmup_epochs)
    if not train.warmup_epochs:
        return start, None
    steps = max(steps_per_epoch, 1)
    return start, lambda step: scheduled_lr(train.lr, train.lr_schedule, epoch + min(step, steps) / steps,
                                            train.epochs, train.warmup_epochs)


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


def weight_average(model: nn.Module, decay: float) -> "torch.optim.swa_utils.AveragedModel":
    """An exponential moving average of ``model``'s parameters and BatchNorm buffers (updated after every step
    by :func:`train_one_epoch`); what it holds is what gets validated and saved when the recipe asks for it.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates (TensorFlow's and timm's rule): a
    model trained from scratch must not carry its random initial weights in its average (measured: at a fixed
    0.998 over 900 steps the average still held 16% of them and predicted one class).
    """
    from torch.optim.swa_utils import AveragedModel

    if not 0.0 < decay < 1.0:
        raise ValueError(f"weight average decay must be in (0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: list, current: list, updates: torch.Tensor) -> None:
        n = float(updates)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # BatchNorm's step counters: keep the model's
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def mixup(alpha: float, seed=None) -> Callable[[torch.Tensor], tuple]:
    """A function that mixes a batch of images with a permutation of itself (mixup, Zhang et al. 2018): it returns
    the mixed images, the permutation (the labels the rest of the loss is on) and the share of the originals, drawn
    from Beta(alpha, alpha). The draws come from a generator of their own, so they leave torch's stream alone."""
    rng = np.random.default_rng(seed)

    def mix(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        share = float(rng.beta(alpha, alpha))
        partners = torch.from_numpy(rng.permutation(images.shape[0])).to(images.device)
        return share * images + (1.0 - share) * images[partners], partners, share

    return mix


def mixup_seed(seed: int, epoch: int, rank: int = 0) -> list[int]:
    """The mixup draws' seed for one epoch of one rank: a resumed run draws what the first one would have."""
    return [seed, epoch, rank]


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    options: StepOptions = StepOptions(), max_steps: Optional[int] = None,
                    label_smoothing: float = 0.0, lr_at_step: Optional[Callable[[int], float]] = None,
                    average: Optional[nn.Module] = None, mixup_alpha: float = 0.0,
                    mixup_seed=None) -> dict:
    """One pass of SGD steps; returns train loss, accuracy, images, seconds and images/s of this process.

    ``lr_at_step(step)`` sets the rate before each step (warm-up, per-step decay); ``average`` (see
    :func:`weight_average`) is updated after each step. The reported loss is the smoothed loss that is trained.
    ``mixup_alpha`` > 0 trains on mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself
    by a factor drawn from Beta(alpha, alpha), and so is the loss; ``mixup_seed`` makes the draws repeatable. Train
    accuracy is then counted against the unmixed labels.
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    mixing = mixup(mixup_alpha, mixup_seed) if mixup_alpha > 0 else None
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        labels = batch["male"].to(options.device, non_blocking=True).long()
        if labels.shape[0] < 2:  # BatchNorm cannot train on one example (a shard's last, odd batch)
            continue
        if lr_at_step is not None:
            set_lr(optimizer, lr_at_step(step))
        images = options.images(batch)
        if mixing is not None:
            images, partners, share = mixing(images)
        with options.autocast():
            logits = model(images)
            scores = logits.float()
            loss = loss_fn(scores, labels)
            if mixing is not None:
                loss = share * loss + (1.0 - share) * loss_fn(scores, labels[partners])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update_parameters(model)
        n = labels.shape[0]
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == labels).sum())
        seen += n
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "images": seen,
            "seconds": seconds, "images_per_s": seen / seconds if seconds > 0 else 0.0}


def train_recipe_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer, train,
                       epoch: int, steps_per_epoch: int, options: StepOptions = StepOptions(),
                       average: Optional[nn.Module] = None, rank: int = 0) -> dict:
    """Epoch ``epoch`` of the recipe ``train`` (a :class:`genderid.config.TrainConfig`): its learning-rate curve,
    label smoothing and mixup, and with ``average`` (see :func:`weight_average`) the weight average.

    The one place that turns the recipe's training options into :func:`train_one_epoch`'s arguments: Ray Train's
    loop, the local loop and the recipe ablations all train through it. Returns :func:`train_one_epoch`'s stats.
    """
    lr, lr_at_step = epoch_lr_curve(train, epoch, steps_per_epoch)
    set_lr(optimizer, lr)
    return train_one_epoch(model, batches, optimizer, options, label_smoothing=train.label_smoothing,
                           lr_at_step=lr_at_step, average=average, mixup_alpha=train.mixup,
                           mixup_seed=mixup_seed(train.seed, epoch, rank))


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
