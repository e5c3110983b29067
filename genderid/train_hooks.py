"""Hooks that the train loop calls at fixed points: instrumentation and fault injection live here, not in the loop.

The loop calls a :class:`TrainHooks` (the default does nothing) at the start and end of each epoch, around the
model's DDP wrapping and around the train batches. The hooks below are what the test suite installs; they are in
the package (not under ``tests/``) because Ray's workers must be able to import them. Pure PyTorch, no Ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable


class TrainHooks:
    """The points where the train loop can be observed or perturbed. Every method defaults to doing nothing."""

    def on_epoch_start(self, epoch: int, rank: int, world: int) -> None:
        """Before the epoch's first batch."""

    def prepare_model(self, model, prepare: Callable):
        """Wrap the model for data parallelism: ``prepare(model)`` (Ray Train's ``prepare_model``) by default."""
        return prepare(model)

    def wrap_train_batches(self, batches: Iterable, model, epoch: int, rank: int) -> Iterable:
        """The train batches of one epoch, as the loop will consume them."""
        return batches

    def on_epoch_end(self, epoch: int, rank: int, module) -> None:
        """After training and validation; ``module`` is the unwrapped model whose weights rank 0 saves."""


class Hooks(TrainHooks):
    """Several hooks, called in order."""

    def __init__(self, *hooks: TrainHooks):
        self.hooks = hooks

    def on_epoch_start(self, epoch, rank, world):
        for hook in self.hooks:
            hook.on_epoch_start(epoch, rank, world)

    def prepare_model(self, model, prepare):
        for hook in self.hooks:
            prepare = _bind(hook, prepare)
        return prepare(model)

    def wrap_train_batches(self, batches, model, epoch, rank):
        for hook in self.hooks:
            batches = hook.wrap_train_batches(batches, model, epoch, rank)
        return batches

    def on_epoch_end(self, epoch, rank, module):
        for hook in self.hooks:
            hook.on_epoch_end(epoch, rank, module)


def _bind(hook: TrainHooks, prepare: Callable) -> Callable:
    return lambda model: hook.prepare_model(model, prepare)


class FailOnce(TrainHooks):
    """Kill the last rank's process at the start of ``epoch``, once (a marker file remembers it fired)."""

    def __init__(self, epoch: int, marker_dir: str):
        self.epoch, self.marker_dir = epoch, marker_dir

    def on_epoch_start(self, epoch, rank, world):
        marker = Path(self.marker_dir) / "failed"
        if epoch == self.epoch and rank == world - 1 and not marker.exists():
            marker.touch()
            time.sleep(3)  # let the controller register the previous epoch's checkpoint first
            os._exit(1)


class HoldLaterRuns(TrainHooks):
    """Let the first run that reaches ``epoch`` train it; hold every later run at the start of ``epoch`` until its
    processes are killed. A sweep that runs one trial at a time then stands still exactly between trials: the
    first trial finished, the next one with ``epoch - 1`` epochs checkpointed (its ranks touch
    ``<dir>/held-rank<R>``), however fast an epoch is."""

    def __init__(self, epoch: int, marker_dir: str):
        self.epoch, self.marker_dir = epoch, marker_dir

    def on_epoch_start(self, epoch, rank, world):
        if epoch == self.epoch and (Path(self.marker_dir) / "passed").exists():
            (Path(self.marker_dir) / f"held-rank{rank}").touch()
            while True:
                time.sleep(1)

    def on_epoch_end(self, epoch, rank, module):
        if epoch == self.epoch and rank == 0:
            (Path(self.marker_dir) / "passed").touch()


class RecordShards(TrainHooks):
    """Write the image ids each rank trained on, per epoch: ``<dir>/epoch<E>-rank<R>.json``."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir
        self._seen: list[str] = []

    def wrap_train_batches(self, batches, model, epoch, rank):
        self._seen = []
        return self._recording(batches)

    def _recording(self, batches):
        for batch in batches:
            self._seen.extend(str(i) for i in batch["image_id"])
            yield batch

    def on_epoch_end(self, epoch, rank, module):
        (Path(self.record_dir) / f"epoch{epoch}-rank{rank}.json").write_text(json.dumps(self._seen))


def state_digest(module) -> dict:
    """SHA-256 of a module's parameters and of its buffers (BatchNorm statistics), in state-dict order."""
    params, buffers = hashlib.sha256(), hashlib.sha256()
    names = {name for name, _ in module.named_parameters()}
    for name, tensor in module.state_dict().items():
        target = params if name in names else buffers
        target.update(name.encode())
        target.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"parameters": params.hexdigest(), "buffers": buffers.hexdigest()}


class RecordDigests(TrainHooks):
    """Write each rank's :func:`state_digest` per epoch: ``<dir>/digest-epoch<E>-rank<R>.json``."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def on_epoch_end(self, epoch, rank, module):
        (Path(self.record_dir) / f"digest-epoch{epoch}-rank{rank}.json").write_text(json.dumps(state_digest(module)))


class RecordProcess(TrainHooks):
    """Write each rank's process id (and its parent's: on Ray, its node's raylet): ``<dir>/process-rank<R>.json``."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def on_epoch_start(self, epoch, rank, world):
        (Path(self.record_dir) / f"process-rank{rank}.json").write_text(
            json.dumps({"pid": os.getpid(), "ppid": os.getppid()}))


class NoTrainSteps(TrainHooks):
    """Train on no batch: weights and BatchNorm statistics stay as they are, so every epoch's val metrics are equal."""

    def wrap_train_batches(self, batches, model, epoch, rank):
        return iter(())


class WithoutDDP(TrainHooks):
    """A negative control: skip the DDP wrapping, so each rank trains alone on its shard without gradient sync."""

    def prepare_model(self, model, prepare):
        return model


class RecordInputs(TrainHooks):
    """Write what each rank's model is fed, per epoch: the input shape of its train batches and the blocks the model
    skips (``GenderNet.input_blocks``): ``<dir>/inputs-depth<unfreeze depth>-epoch<E>-rank<R>.json``."""

    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def wrap_train_batches(self, batches, model, epoch, rank):
        module = getattr(model, "module", model)
        shapes = set()
        for batch in batches:
            shapes.add(tuple(batch["image"].shape[1:]))
            yield batch
        (Path(self.record_dir) / f"inputs-depth{module.unfreeze_depth}-epoch{epoch}-rank{rank}.json").write_text(
            json.dumps({"shapes": sorted(shapes), "input_blocks": module.input_blocks}))
