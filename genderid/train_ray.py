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
import math
import os
import tempfile
import time
from typing import Optional

import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from genderid import engine, runs, storage, tracking
from genderid.calibration import Calibration
from genderid.checkpoint import load_checkpoint, save_checkpoint
from genderid.config import Config, ConfigError, config_from_dict
from genderid.model import build_model
from genderid.preprocess import Preprocessing
from genderid.train_hooks import TrainHooks


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


def sync_buffers_from_rank0(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    Each rank updates its statistics on its own shard, while only rank 0's model is saved; after this, every rank
    validates exactly the model that the checkpoint holds, so val metrics, checkpoint ranking and early stopping
    describe the saved model.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def train_loop(loop_config: dict) -> None:
    """Per-worker loop: resume if a checkpoint exists, then train / validate / report / checkpoint each epoch."""
    config = config_from_dict(loop_config["config"])
    hooks: TrainHooks = loop_config.get("hooks") or TrainHooks()
    run_label = f"{loop_config['label']} " if loop_config.get("label") else ""  # "trial <id> ": whose epoch line
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.train.seed + rank)
    sharing = context.get_local_world_size() * loop_config.get("concurrent_runs", 1)
    torch.set_num_threads(config.scaling.torch_threads or worker_threads(_node_cpus(), sharing, config.scaling.use_gpu))
    device = ray.train.torch.get_device()
    options = engine.StepOptions.for_device(device)
    preprocessing = Preprocessing.for_data(config.data)

    model = build_model(config.model)
    state = {"epoch": 0, "best_val_loss": None, "bad_epochs": 0, "history": []}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            loaded = load_checkpoint(directory, with_train_state=True)
        # With a weight average the checkpoint's model is the average; the trained weights are in its train state.
        model.load_state_dict(loaded.train_state.get("trained_weights") or loaded.model.state_dict())
        state = loaded.train_state["loop"]
    # On a feature cache the batches hold the frozen prefix's outputs: the model starts after that prefix.
    model.set_input_blocks(loop_config.get("input_blocks", 0))
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = hooks.prepare_model(model, ray.train.torch.prepare_model)
    module = getattr(model, "module", model)
    optimizer = engine.make_optimizer(model, config.train.optimizer, config.train.lr, config.train.weight_decay)
    # What is validated, checkpointed and served: the weights, or their moving average.
    average = engine.weight_average(module, config.train.weight_average_decay) \
        if config.train.weight_average_decay else None
    evaluated = average.module if average is not None else module
    if restored is not None:
        optimizer.load_state_dict(loaded.train_state["optimizer"])
        if average is not None and "trained_weights" in loaded.train_state:
            average.module.load_state_dict(loaded.model.state_dict())
            average.n_averaged.fill_(int(loaded.train_state["averaged_steps"]))
    start_epoch = state["epoch"] + 1
    # A run restored from the epoch where early stopping stopped it (rerun, or killed just after) is finished.
    last_epoch = state["epoch"] if state["history"] and state["history"][-1].get("early_stopped") \
        else config.train.epochs
    steps_per_epoch = math.ceil(loop_config["train_rows"] / world / config.train.batch_size)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    from genderid.ray_data import torch_collate

    for epoch in range(start_epoch, last_epoch + 1):
        hooks.on_epoch_start(epoch, rank, world)
        batches = hooks.wrap_train_batches(
            train_shard.iter_torch_batches(batch_size=config.train.batch_size,
                                           local_shuffle_buffer_size=config.train.batch_size * 8,
                                           collate_fn=torch_collate()), model, epoch, rank)
        if rank == 0 and loop_config.get("progress"):
            batches = _epoch_bar(batches, epoch, config, world, loop_config["train_rows"])
        join = model.join() if hasattr(model, "join") else contextlib.nullcontext()
        started = time.perf_counter()
        with join:
            stats = engine.train_recipe_epoch(model, batches, optimizer, config.train, epoch, steps_per_epoch,
                                              options, average=average, rank=rank)
        train_seconds = time.perf_counter() - started
        sync_buffers_from_rank0(module)
        if average is not None:
            sync_buffers_from_rank0(average)
        # Evaluate the unwrapped module: DDP's forward syncs buffers collectively, which would hang on shards
        # of unequal length.
        val_batches = val_shard.iter_torch_batches(batch_size=64, collate_fn=torch_collate())
        val = engine.Predictions.merge(_gather(engine.predict(evaluated, val_batches, options)))
        parts = _gather((stats["loss"] * stats["images"], stats["accuracy"] * stats["images"], stats["images"],
                         train_seconds))
        metrics = _epoch_metrics(epoch, start_epoch, parts, val.metrics(), time.perf_counter() - started)
        # Fitted on this epoch's own val pass, so each checkpoint carries the calibration of exactly its weights.
        calibration = Calibration.fit(val.margins, val.y_true, config.train.calibration_target_accuracy)
        hooks.on_epoch_end(epoch, rank, module)
        # Every rank sees the same gathered val loss, so every rank takes the same decision.
        stop = engine.early_stopping_update(state, metrics["val_loss"], config.train.early_stopping_patience)
        metrics["early_stopped"] = stop
        state["epoch"] = epoch
        state["history"] = state["history"] + [metrics]
        if rank == 0:
            # The whole run's curve, beside best.json; checkpoints alone may not hold the last epochs (top-k).
            storage.write_bytes(runs.path(loop_config["run_dir"], runs.HISTORY_FILE),
                                json.dumps(state["history"], indent=2).encode())
            print(f"[train] {run_label}epoch {epoch}/{config.train.epochs}: train loss {metrics['train_loss']:.4f}, "
                  f"val loss {metrics['val_loss']:.4f}, val accuracy {metrics['val_accuracy']:.4f}, "
                  f"{metrics['images_per_s']:.1f} images/s, {metrics['epoch_seconds']:.1f} s", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                train_state = {"optimizer": optimizer.state_dict(), "loop": state}
                if average is not None:
                    train_state.update(trained_weights=module.state_dict(),
                                       averaged_steps=int(average.n_averaged))
                save_checkpoint(directory, evaluated, preprocessing=preprocessing, config=config.to_dict(),
                                metrics=metrics, epoch=epoch, history=state["history"], calibration=calibration,
                                train_state=train_state)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break


def worker_threads(node_cpus: int, sharing: int, use_gpu: bool) -> int:
    """``scaling.torch_threads: 0``: the node's cores shared among the Train workers that may run on it at once
    (``sharing``: this run's workers on the node x the sweep's concurrent trials).

    Ray sets a worker's threads to its CPU reservation, which on a small node must leave a CPU to Ray Data's Parquet
    sampling: a lone worker then trains on half a 2-core machine. The decode tasks that share the cores run in
    short bursts between steps, so the worker may use its share of all the node's cores (measured in
    ``benchmarks/train_throughput.py``). On GPU workers the maths runs on the GPU: threads stay at what Ray gives.
    """
    if use_gpu:
        return max(1, torch.get_num_threads())
    return max(1, node_cpus // max(1, sharing))


def _node_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _epoch_bar(batches, epoch: int, config: Config, world: int, train_rows: int):
    """Rank 0's batches of this epoch, counted by a bar that Ray's ``tqdm_ray`` draws on the driver's console."""
    from ray.experimental.tqdm_ray import tqdm

    # Ray Data hands blocks to whichever rank asks first (equal=False), so rank 0's share is known only at the
    # end: the bar counts up to a fair-share estimate, then ends at what rank 0 really trained on.
    fair_share = math.ceil(train_rows / world / config.train.batch_size)
    bar = tqdm(desc=f"epoch {epoch}/{config.train.epochs}", total=fair_share, unit="batches")
    try:
        for batch in batches:
            yield batch
            bar.update(1)
    finally:
        bar.total = max(bar.n, 1)
        bar.close()


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


def build_trainer(config: Config, hooks: Optional[TrainHooks] = None, callbacks: tuple = (),
                  progress_bars: Optional[bool] = None, concurrent_runs: int = 1,
                  feature_cache_root: Optional[str] = None, label: str = ""):
    """The TorchTrainer for ``config``: Ray Data splits, scaling, storage, top-k checkpoints, failure policy.

    ``progress_bars``: rank 0 draws a bar per epoch (default: where the driver's console is a terminal, see
    :mod:`genderid.progress`; Tune trials pass False, their sweep has one bar over the trials).
    ``concurrent_runs``: how many such runs share the cluster at once (a sweep's trials), for the thread budget.
    ``feature_cache_root``: where ``train.feature_cache`` finds or builds its caches (default: under
    ``storage.path``; a sweep's trials use the sweep's).
    ``label``: names the run in its epoch lines (a sweep's trial: ``trial <id>``, as in the sweep's table).
    """
    from genderid import progress

    train_rows = check_data_source(config)
    check_shared_storage(config.storage.path, _alive_node_hosts())
    # A sweep's trials read the caches that the sweep built and announced before they started.
    datasets, input_blocks = training_datasets(config, feature_cache_root,
                                               log=print if feature_cache_root is None else lambda _: None)
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "hooks": hooks or TrainHooks(),
                           "run_dir": runs.run_dir_of(config),
                           "progress": progress.enabled() if progress_bars is None else progress_bars,
                           "train_rows": train_rows, "concurrent_runs": concurrent_runs,
                           "input_blocks": input_blocks, "label": label},
        scaling_config=ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=config.scaling.placement_strategy),
        run_config=RunConfig(
            name=config.storage.name, storage_path=runs.storage_root(config.storage.path), callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints,
                                               checkpoint_score_attribute=config.train.checkpoint_metric,
                                               checkpoint_score_order=config.train.checkpoint_mode),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
        ),
        datasets=datasets,
        dataset_config=TrainDataConfig(),
    )


def training_datasets(config: Config, feature_cache_root: Optional[str] = None, log=print) -> tuple[dict, int]:
    """The train and val Ray Datasets of a run, and how many conv blocks their inputs have been through:
    decoded images (0), or with ``train.feature_cache`` the cached outputs of the model's frozen prefix."""
    from genderid.model import NUM_BLOCKS
    from genderid.ray_data import load_split

    cpus, tasks = config.data.cpus_per_decode_task, config.data.decode_tasks
    frozen = NUM_BLOCKS - config.model.unfreeze_depth
    if config.train.feature_cache and frozen:
        from genderid import feature_cache_ray

        root = feature_cache_root or runs.feature_cache_root(config.storage.path)
        cache_dir = feature_cache_ray.ensure(config, root, [frozen], log=log)[frozen]
        return {"train": feature_cache_ray.load_cached_split(cache_dir, "train", cpus, tasks).randomize_block_order(),
                "val": feature_cache_ray.load_cached_split(cache_dir, "val", cpus, tasks)}, frozen
    preprocessing = Preprocessing.for_data(config.data)
    return {"train": load_split(config.data.source, "train", preprocessing, augment=config.data.augment,
                                num_cpus=cpus, tasks=tasks).randomize_block_order(),
            "val": load_split(config.data.source, "val", preprocessing, num_cpus=cpus, tasks=tasks)}, 0


def check_data_source(config: Config) -> int:
    """``data.source`` is set and is a prepared data set with train and val rows; returns the train rows."""
    from genderid import shards

    if not config.data.source:
        raise ConfigError("data.source: set it to a prepared data set (the output of `genderid prepare`)")
    counts = shards.read_manifest(config.data.source)["counts"]
    for split in ("train", "val"):
        if not counts[split]["total"]:
            raise shards.DatasetError(f"{config.data.source}: the {split} split has no rows; training needs both "
                                      "train and val rows (see `genderid prepare --split`)")
    return int(counts["train"]["total"])


# File systems that every node of a cluster can share under one path.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "fuse.", "9p", "efs", "wekafs")


def _filesystem_type(path: str, mounts_file: str = "/proc/mounts") -> str:
    """The type of the file system that holds ``path`` (the longest mount point that contains it)."""
    path = os.path.abspath(path)
    best, kind = "", ""
    try:
        with open(mounts_file) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 3 and (path == fields[1] or path.startswith(fields[1].rstrip("/") + "/")):
                    if len(fields[1]) > len(best):
                        best, kind = fields[1], fields[2]
    except OSError:
        return ""
    return kind


def check_shared_storage(storage_path: str, hosts: set, filesystem_type: Optional[str] = None) -> None:
    """Refuse a local ``storage.path`` on a cluster whose nodes are on more than one host.

    Ray Train writes each checkpoint from a worker to ``storage.path``: on several hosts a plain local path
    scatters checkpoints over their disks, and resuming or finding the best one fails later. S3 or a network
    file system (NFS, Lustre, a FUSE mount ...) mounted at the same path on every node is what works.
    """
    if storage.is_remote(storage_path) or len(hosts) <= 1:
        return
    kind = _filesystem_type(storage_path) if filesystem_type is None else filesystem_type
    if kind and any(kind == fs or (fs.endswith(".") and kind.startswith(fs)) for fs in NETWORK_FILESYSTEMS):
        return
    raise ConfigError(f"storage.path: {storage_path} is a local {kind or 'unknown'} path, but the cluster's nodes are "
                      f"on {len(hosts)} hosts; use an s3:// URI or a shared file system mounted at the same path "
                      "on every node")


def _alive_node_hosts() -> set:
    import ray

    if not ray.is_initialized():
        return set()
    return {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}


def run_training(config: Config, hooks: Optional[TrainHooks] = None) -> dict:
    """Fit, write ``<storage.path>/<storage.name>/best.json`` for the best checkpoint Ray kept, and return it."""
    from genderid.ray_cleanup import wait_for_dead_jobs_runs
    from genderid.ray_runtime import caller_signal_handlers, init_ray
    from genderid.tracking_ray import EpochTracker

    check_data_source(config)  # before Ray starts: bad input costs nothing
    init_ray()
    wait_for_dead_jobs_runs()  # a killed earlier run of this name may still be writing into its folder
    run = runs.run_dir_of(config)
    history = runs.path(run, runs.HISTORY_FILE)
    tracker = tracking.open_tracker(config)
    mlflow_run = None
    if tracker is not None:
        mlflow_run = tracking.start_run(tracker, run, "train", config.storage.name,
                                        tracking.flat_params(config.to_dict()))
    failed = True
    try:
        callbacks = () if mlflow_run is None else (EpochTracker(tracker, mlflow_run, history),)
        with caller_signal_handlers():
            result = build_trainer(config, hooks, callbacks).fit()
        if result.error is not None:
            raise result.error
        checkpoint, _ = runs.best_kept_checkpoint(run, config.train.checkpoint_metric, config.train.checkpoint_mode)
        best = runs.write_best(run, "train", checkpoint)
        failed = False
    finally:
        if mlflow_run is not None:
            if not failed:  # a resumed run that had no epoch left to run reported none: its history is final
                tracking.backfill(tracker, mlflow_run, history)
            tracking.log_files(tracker, mlflow_run, {name: runs.path(run, name)
                                                     for name in (runs.BEST_FILE, runs.HISTORY_FILE)})
            tracking.finish_run(tracker, mlflow_run, failed,
                                tags={} if failed else {"best_checkpoint": best["checkpoint"]})
    return best
