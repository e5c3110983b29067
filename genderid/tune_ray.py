"""Ray Tune glue: sweeps over learning rate x unfreeze depth, each trial a full Ray Train run.

Ray 2.60's Tune-over-Train pattern: a Tune *function* trainable builds the trial's TorchTrainer with
:func:`genderid.train_ray.build_trainer` (the same code as ``genderid train``) and fits it with a
``TuneReportCallback``, which forwards every epoch's metrics and checkpoint path to Tune. ASHA stops weak trials
on ``tune.metric``, counted in our own ``epoch`` (Tune's ``training_iteration`` restarts at 0 after a resume).
"""
from __future__ import annotations

import copy
import json
import math
import os

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from genderid import storage
from genderid.report import plot_sweep
from genderid.config import Config, config_from_dict
from genderid.train_ray import build_trainer, storage_uri

PARAMS = ("lr", "unfreeze_depth", "batch_size", "weight_decay")
TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its Train run; Tune rejects 0


def apply_params(values: dict, params: dict) -> dict:
    """Put searched values (keys of ``PARAMS``) into a config dict in place; returns it."""
    for key, value in params.items():
        section = "model" if key == "unfreeze_depth" else "train"
        values[section][key] = value
    return values


def searched_params(best: dict) -> dict:
    """The searched values of a sweep's ``best.json`` (its ``config/<param>`` entries)."""
    return {k: v for k in PARAMS if (v := best["metrics"].get(f"config/{k}")) is not None}


def trial_config(base: dict, params: dict, trials_dir: str, trial_id: str) -> Config:
    """The trial's full config: the sweep's config with the sampled values, run under ``trials_dir/trial_id``."""
    values = apply_params(copy.deepcopy(base), params)
    values["train"]["epochs"] = values["tune"]["max_epochs"]
    # Keep the checkpoints that are best by the sweep's metric, so the best one is never rotated away.
    values["train"]["checkpoint_metric"] = values["tune"]["metric"]
    values["train"]["checkpoint_mode"] = values["tune"]["mode"]
    values["storage"] = {"path": trials_dir, "name": trial_id}
    return config_from_dict(values)


def run_trial(params: dict, base: dict, trials_dir: str) -> None:
    """The Tune trainable: one Ray Train run."""
    config = trial_config(base, params, trials_dir, tune.get_context().get_trial_id())
    result = build_trainer(config, callbacks=(TuneReportCallback(),)).fit()
    if result.error is not None:
        raise result.error


def search_space(config: Config) -> dict:
    space = {"lr": tune.loguniform(*config.tune.lr), "unfreeze_depth": tune.choice(list(config.tune.unfreeze_depth))}
    if config.tune.batch_size:
        space["batch_size"] = tune.choice(list(config.tune.batch_size))
    if config.tune.weight_decay:
        space["weight_decay"] = tune.choice(list(config.tune.weight_decay))
    return space


def default_concurrency(config: Config, resources: dict) -> int:
    """How many trials the cluster can run at once. Tune does not count Train workers, so we must.

    One CPU stays free for Ray Data (its file listing takes a whole CPU); on GPU clusters GPUs bound it too.
    """
    per_trial_cpu = config.scaling.num_workers * config.scaling.cpus_per_worker + TRIAL_DRIVER_CPU
    count = math.floor((resources.get("CPU", 0) - 1) / per_trial_cpu + 1e-9)
    if config.scaling.use_gpu:
        per_trial_gpu = config.scaling.num_workers * config.scaling.gpus_per_worker
        count = min(count, math.floor(resources.get("GPU", 0) / per_trial_gpu + 1e-9))
    if count < 1:
        raise ValueError(f"scaling: one trial needs {per_trial_cpu} CPU(s) + 1 for Ray Data, the cluster has "
                         f"{resources.get('CPU', 0)}; lower scaling.num_workers or scaling.cpus_per_worker")
    return count


def _uri(path: str, config: Config) -> str:
    return f"s3://{path}" if config.storage.path.startswith("s3://") and not path.startswith("s3://") else path


def summarise(grid, config: Config) -> list[dict]:
    """One row per trial: its parameters, best metrics, epochs run, how it ended and its best checkpoint."""
    metric, mode = config.tune.metric, config.tune.mode
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        row = {"trial_id": (result.metrics or {}).get("trial_id") or os.path.basename(result.path or ""),
               **{f"config/{k}": v for k, v in result.config.items() if k in PARAMS}}
        if frame is None or frame.empty or metric not in frame:
            rows.append({**row, "epochs_run": 0, "ended": "error" if result.error else "no report"})
            continue
        best = frame.loc[frame[metric].idxmin() if mode == "min" else frame[metric].idxmax()]
        last = frame.iloc[-1]
        epochs = int(frame["epoch"].max())
        if result.error is not None:
            ended = "error"
        elif bool(last.get("early_stopped", False)):
            ended = "early stopping (patience)"
        elif epochs >= config.tune.max_epochs:
            ended = "completed"
        else:
            ended = "stopped by ASHA"
        rows.append({**row, "best_epoch": int(best["epoch"]), f"best_{metric}": float(best[metric]),
                     "val_loss": float(best["val_loss"]), "val_accuracy": float(best["val_accuracy"]),
                     "val_auc": float(best["val_auc"]), "epochs_run": epochs, "ended": ended,
                     "checkpoint": _uri(str(best["checkpoint_path"]), config)})
    reverse = mode == "max"
    return sorted(rows, key=lambda r: r.get(f"best_{metric}", -math.inf if reverse else math.inf), reverse=reverse)


def results_table(rows: list[dict], metric: str = "val_accuracy") -> str:
    """The sweep's rows as a plain-text table, best first (what `genderid tune` prints)."""
    columns = ["trial_id", "config/lr", "config/unfreeze_depth", f"best_{metric}", "val_loss", "epochs_run", "ended"]
    lines = [" | ".join(columns)]
    for row in rows:
        lines.append(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                for c in columns))
    return "\n".join(lines)


def write_results(rows: list[dict], config: Config, sweep_dir: str) -> dict:
    """results.csv, sweep.png and best.json under the sweep folder; returns best.json's content."""
    import pandas as pd

    storage.write_bytes(storage.join(sweep_dir, "results.csv"), pd.DataFrame(rows).to_csv(index=False).encode())
    storage.write_bytes(storage.join(sweep_dir, "sweep.png"), plot_sweep(rows))
    finished = [r for r in rows if "checkpoint" in r]
    if not finished:
        raise RuntimeError(f"no trial of sweep {config.storage.name} reported a checkpoint")
    best_row = finished[0]
    from genderid.checkpoint import read_meta

    best = {"checkpoint": best_row["checkpoint"],
            "metrics": {k: v for k, v in best_row.items() if k not in ("checkpoint",)},
            "config": read_meta(best_row["checkpoint"])["config"]}
    storage.write_bytes(storage.join(sweep_dir, "best.json"), json.dumps(best, indent=2).encode())
    return best


def build_tuner(config: Config):
    """A new sweep, or the interrupted one under ``<storage.path>/<storage.name>`` (finished trials kept)."""
    import ray
    from ray.tune import RunConfig, TuneConfig, Tuner

    sweep_dir = storage.join(storage_uri(config), config.storage.name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.to_dict(), trials_dir=storage.join(sweep_dir, "trials")),
        {"CPU": TRIAL_DRIVER_CPU})
    experiment = storage.join(sweep_dir, "tune")
    if Tuner.can_restore(experiment):
        return Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True), sweep_dir
    concurrency = config.tune.max_concurrent_trials or default_concurrency(config, ray.cluster_resources())
    scheduler = ASHAScheduler(time_attr="epoch", max_t=config.tune.max_epochs, grace_period=config.tune.grace_period,
                              reduction_factor=config.tune.reduction_factor)
    tuner = Tuner(
        trainable, param_space=search_space(config),
        tune_config=TuneConfig(metric=config.tune.metric, mode=config.tune.mode, num_samples=config.tune.num_samples,
                               max_concurrent_trials=concurrency, scheduler=scheduler),
        run_config=RunConfig(name="tune", storage_path=sweep_dir),
    )
    return tuner, sweep_dir


def run_sweep(config: Config) -> tuple[list[dict], dict]:
    """Run (or resume) the sweep; write its results; return the rows and best.json."""
    from genderid.ray_runtime import init_ray

    if not config.data.source:
        raise ValueError("data.source: set it to a prepared data set (the output of `genderid prepare`)")
    init_ray()
    tuner, sweep_dir = build_tuner(config)
    grid = tuner.fit()
    rows = summarise(grid, config)
    return rows, write_results(rows, config, sweep_dir)
