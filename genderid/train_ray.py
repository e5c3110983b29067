"""Ray Train glue: DDP fine-tuning fed by Ray Data shards. The maths is :mod:`genderid.engine`.

``build_trainer`` is the one place a :class:`ray.train.torch.TorchTrainer` is made; ``genderid train``,
``jobs/train.py`` and every Tune trial use it.

Learning rate and global batch: ``train.lr`` applies as given to the global batch of
``train.batch_size x scaling.num_workers`` images (DDP averages gradients); nothing is rescaled automatically.
When changing the worker count, scale ``train.lr`` yourself (linear scaling is a fair start for Adam at small
batch sizes; Tune can search it).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from genderid import engine, storage
from genderid.checkpoint import load_checkpoint, save_checkpoint
from genderid.config import Config, config_from_dict
from genderid.model import build_model
from genderid.preprocess import Preprocessing


class TrainDataConfig(DataConfig):
    """Splits train *and* val across workers without dropping rows (``equal=False``).

    Ray Train's default ``equal=True`` split may drop rows to even out shards; here no row is dropped or read
    twice, and DDP's ``join()`` absorbs the uneven number of train batches.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=False)):
                output[rank][name] = split
        return output


def _gather(obj):
    """Every rank's ``obj``, on every rank (a list of one outside DDP)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def train_loop(loop_config: dict) -> None:
    """Per-worker loop: resume if a checkpoint exists, then train / validate / report / checkpoint each epoch."""
    config = config_from_dict(loop_config["config"])
    hooks = loop_config.get("hooks") or {}
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.train.seed + rank)
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    device = ray.train.torch.get_device()
    options = engine.StepOptions.for_device(device)
    preprocessing = Preprocessing(image_size=tuple(config.data.image_size))

    model = build_model(config.model)
    state = {"epoch": 0, "best_val_loss": None, "bad_epochs": 0, "history": []}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            loaded = load_checkpoint(directory, with_train_state=True)
        model.load_state_dict(loaded.model.state_dict())
        state = loaded.train_state["loop"]
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = engine.make_optimizer(model, config.train.optimizer, config.train.lr, config.train.weight_decay)
    if restored is not None:
        optimizer.load_state_dict(loaded.train_state["optimizer"])
    start_epoch = state["epoch"] + 1

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    from genderid.ray_data import torch_collate

    for epoch in range(start_epoch, config.train.epochs + 1):
        if hooks.get("fail_at_epoch") == epoch and rank == world - 1:
            marker = Path(hooks["marker_dir"]) / "failed"
            if not marker.exists():  # fail once: the replacement worker must get past this epoch
                marker.touch()
                time.sleep(3)  # let the controller register the previous epoch's checkpoint first
                os._exit(1)
        engine.set_lr(optimizer, engine.scheduled_lr(config.train.lr, config.train.lr_schedule, epoch,
                                                     config.train.epochs))
        seen_ids: list[str] = []
        batches = train_shard.iter_torch_batches(batch_size=config.train.batch_size,
                                                 local_shuffle_buffer_size=config.train.batch_size * 8,
                                                 collate_fn=torch_collate())
        if hooks.get("record_dir"):
            batches = _recording(batches, seen_ids)
        join = model.join() if hasattr(model, "join") else contextlib.nullcontext()
        started = time.perf_counter()
        with join:
            stats = engine.train_one_epoch(model, batches, optimizer, options)
        train_seconds = time.perf_counter() - started
        # Evaluate the unwrapped module: DDP's forward syncs buffers collectively, which would hang on shards
        # of unequal length.
        val_batches = val_shard.iter_torch_batches(batch_size=64, collate_fn=torch_collate())
        val = engine.Predictions.merge(_gather(engine.predict(getattr(model, "module", model), val_batches, options)))
        parts = _gather((stats["loss"] * stats["images"], stats["accuracy"] * stats["images"], stats["images"],
                         train_seconds))
        metrics = _epoch_metrics(epoch, start_epoch, parts, val.metrics(), time.perf_counter() - started)
        if hooks.get("record_dir"):
            record = Path(hooks["record_dir"]) / f"epoch{epoch}-rank{rank}.json"
            record.write_text(json.dumps(seen_ids))
        # Every rank sees the same gathered val loss, so every rank takes the same decision.
        stop = engine.early_stopping_update(state, metrics["val_loss"], config.train.early_stopping_patience)
        metrics["early_stopped"] = stop
        state["epoch"] = epoch
        state["history"] = state["history"] + [metrics]
        if rank == 0:
            # The whole run's curve, beside best.json; checkpoints alone may not hold the last epochs (top-k).
            storage.write_bytes(storage.join(loop_config["run_dir"], "history.json"),
                                json.dumps(state["history"], indent=2).encode())
            print(f"[train] epoch {epoch}/{config.train.epochs}: train loss {metrics['train_loss']:.4f}, "
                  f"val loss {metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.4f}, "
                  f"{metrics['images_per_s']:.1f} images/s, {metrics['epoch_seconds']:.1f} s", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(directory, model, preprocessing=preprocessing, config=config.to_dict(),
                                metrics=metrics, epoch=epoch, history=state["history"],
                                train_state={"optimizer": optimizer.state_dict(), "loop": state})
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break


def _epoch_metrics(epoch: int, start_epoch: int, train_parts: list, val_metrics: dict, seconds: float) -> dict:
    """One epoch's report: train figures summed over ranks (loss sum, correct, images, seconds), val metrics."""
    images = sum(p[2] for p in train_parts)
    return {
        "epoch": epoch, "start_epoch": start_epoch,
        "train_loss": sum(p[0] for p in train_parts) / max(images, 1),
        "train_accuracy": sum(p[1] for p in train_parts) / max(images, 1),
        "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
        "val_balanced_accuracy": val_metrics["balanced_accuracy"], "val_auc": val_metrics["auc"],
        "val_count": val_metrics["count"], "train_images": images,
        "images_per_s": images / max(max(p[3] for p in train_parts), 1e-9), "epoch_seconds": seconds,
    }


def _recording(batches, seen_ids: list):
    for batch in batches:
        seen_ids.extend(str(i) for i in batch["image_id"])
        yield batch


def storage_uri(config: Config) -> str:
    return config.storage.path if config.storage.path.startswith("s3://") else os.path.abspath(config.storage.path)


def build_trainer(config: Config, hooks: Optional[dict] = None, callbacks: tuple = ()):
    """The TorchTrainer for ``config``: Ray Data splits, scaling, storage, top-k checkpoints, failure policy."""
    from genderid.ray_data import load_split

    if not config.data.source:
        raise ValueError("data.source: set it to a prepared data set (the output of `genderid prepare`)")
    preprocessing = Preprocessing(image_size=tuple(config.data.image_size))
    datasets = {
        "train": load_split(config.data.source, "train", preprocessing, augment=config.data.augment,
                            num_cpus=config.data.cpus_per_decode_task).randomize_block_order(),
        "val": load_split(config.data.source, "val", preprocessing, num_cpus=config.data.cpus_per_decode_task),
    }
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "hooks": hooks or {},
                           "run_dir": storage.join(storage_uri(config), config.storage.name)},
        scaling_config=ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=config.storage.name, storage_path=storage_uri(config), callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints,
                                               checkpoint_score_attribute=config.train.checkpoint_metric,
                                               checkpoint_score_order=config.train.checkpoint_mode),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
        ),
        datasets=datasets,
        dataset_config=TrainDataConfig(),
    )


def checkpoint_uri(checkpoint, config: Config) -> str:
    """A Ray checkpoint's location as a user-facing path or ``s3://`` URI."""
    return f"s3://{checkpoint.path}" if config.storage.path.startswith("s3://") else checkpoint.path


def best_of(result, config: Config) -> tuple[str, dict]:
    """The best kept checkpoint of a finished run (by ``train.checkpoint_metric``) and its metrics."""
    if not result.best_checkpoints:
        raise RuntimeError(f"the run produced no checkpoint (error: {result.error})")
    metric, mode = config.train.checkpoint_metric, config.train.checkpoint_mode
    pick = min if mode == "min" else max
    checkpoint, metrics = pick(result.best_checkpoints, key=lambda pair: pair[1][metric])
    return checkpoint_uri(checkpoint, config), dict(metrics)


def run_training(config: Config, hooks: Optional[dict] = None) -> dict:
    """Fit, write ``<storage.path>/<storage.name>/best.json``, and return it."""
    from genderid.ray_runtime import init_ray

    init_ray()
    result = build_trainer(config, hooks).fit()
    if result.error is not None:
        raise result.error
    location, metrics = best_of(result, config)
    best = {"checkpoint": location, "metrics": _json_safe(metrics), "config": config.to_dict()}
    storage.write_bytes(storage.join(storage_uri(config), config.storage.name, "best.json"),
                        json.dumps(best, indent=2).encode())
    return best


def _json_safe(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in metrics.items()
            if isinstance(v, (int, float, str, bool, np.floating, np.integer))}
