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
from typing import Optional

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from genderid import console, runs, search, storage, tracking
from genderid.checkpoint import CheckpointError
from genderid.config import Config, ConfigError, config_from_dict
from genderid.report import plot_sweep
from genderid.train_hooks import TrainHooks
from genderid.tracking_ray import TrialTracker
from genderid.train_ray import build_trainer, check_data_source

TRIAL_DRIVER_CPU = 0.01  # the trial function only waits on its Train run; Tune rejects 0


def trial_config(base: dict, params: dict, trials_dir: str, trial_id: str) -> Config:
    """The trial's full config: the sweep's config with the sampled values, run under ``trials_dir/trial_id``."""
    values = search.apply_params(copy.deepcopy(base), search.params_of(params))
    values["train"]["epochs"] = values["tune"]["max_epochs"]
    values["train"]["feature_cache"] = values["train"]["feature_cache"] or values["tune"]["feature_cache"]
    # Keep the checkpoints that are best by the sweep's metric, so the best one is never rotated away.
    values["train"]["checkpoint_metric"] = values["tune"]["metric"]
    values["train"]["checkpoint_mode"] = values["tune"]["mode"]
    values["storage"] = {"path": trials_dir, "name": trial_id}
    return config_from_dict(values)


def run_trial(params: dict, base: dict, trials_dir: str, hooks: Optional[TrainHooks] = None,
              concurrent_trials: int = 1, feature_cache_root: Optional[str] = None) -> None:
    """The Tune trainable: one Ray Train run (``hooks``: see :mod:`genderid.train_hooks`)."""
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base, params, trials_dir, trial_id)
    result = build_trainer(config, hooks=hooks, callbacks=(TuneReportCallback(),), progress_bars=False,
                           concurrent_runs=concurrent_trials, feature_cache_root=feature_cache_root,
                           label=f"trial {trial_id}").fit()
    if result.error is not None:
        raise result.error


def search_space(config: Config) -> dict:
    """Tune's param space, from :data:`genderid.search.PARAMS`."""
    makers = {"loguniform": lambda bounds: tune.loguniform(*bounds), "choice": lambda values: tune.choice(values)}
    return {name: makers[kind](values) for name, (kind, values) in search.space(config).items()}


def default_concurrency(config: Config, resources: dict) -> int:
    """How many trials the cluster's resources *now* can run at once; never 0. Tune does not count Train workers.

    One CPU stays free for Ray Data (its Parquet sampling, as a trial makes its data sets, takes a whole CPU); on GPU
    clusters GPUs bound it too.
    A cluster that autoscales from zero has none of its workers' resources yet: there the count would be 0, and
    ``tune.max_concurrent_trials`` must say how many trials may run (the shipped ``cluster/`` configs set it).
    """
    per_trial_cpu = config.scaling.num_workers * config.scaling.cpus_per_worker + TRIAL_DRIVER_CPU
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    count = math.floor((cpus - 1) / per_trial_cpu + 1e-9)
    need = f"{per_trial_cpu:g} CPU(s) (+1 for Ray Data)"
    if config.scaling.use_gpu:
        per_trial_gpu = config.scaling.num_workers * config.scaling.gpus_per_worker
        count = min(count, math.floor(gpus / per_trial_gpu + 1e-9))
        need += f" and {per_trial_gpu:g} GPU(s)"
    if count < 1:
        raise ConfigError(
            f"tune.max_concurrent_trials: one trial needs {need}, the cluster has {cpus:g} CPU(s) and {gpus:g} "
            "GPU(s) now. On a cluster that autoscales, set tune.max_concurrent_trials to how many trials may run "
            "at once; otherwise lower scaling.num_workers or scaling.cpus_per_worker")
    return count


def concurrency(config: Config, resources: dict) -> int:
    """``tune.max_concurrent_trials`` when set, else what the present resources allow."""
    return config.tune.max_concurrent_trials or default_concurrency(config, resources)


class TrialProgress(tune.Callback):
    """One bar over the sweep's trials on the driver's console, with the best value so far
    (:mod:`genderid.progress` decides whether it is drawn)."""

    def __init__(self, total: int, metric: str, mode: str):
        self.total, self.metric, self.mode = total, metric, mode
        self._bar, self._best = None, None

    def setup(self, **info) -> None:
        from genderid import progress

        self._bar = progress.bar(self.total, "sweep", "trials")

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self._bar is not None and iteration == 0:  # a resumed sweep: its finished trials count from the start
            self._bar.update(sum(t.status in ("TERMINATED", "ERROR") for t in trials))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and (self._best is None or (value > self._best) == (self.mode == "max")):
            self._best = value
            if self._bar is not None:
                self._bar.set_postfix_str(f"best {self.metric} {value:.4f}", refresh=False)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if self._bar is not None:
            self._bar.update(1)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials, **info) -> None:
        if self._bar is not None:
            self._bar.close()

    def __getstate__(self) -> dict:  # Tune saves its callbacks with the sweep; a bar is not state
        return {**self.__dict__, "_bar": None}


def _ended(frame, result, config: Config) -> str:
    last = frame.iloc[-1]
    if result.error is not None:
        return "error"
    if bool(last.get("early_stopped", False)):
        return "early stopping (patience)"
    if int(frame["epoch"].max()) >= config.tune.max_epochs:
        return "completed"
    return "stopped by ASHA"


def summarise(grid, config: Config, sweep_dir: str) -> list[dict]:
    """One row per trial, best first: its parameters, epochs run, how it ended, and its best *kept* checkpoint.

    The checkpoint and its metrics come from what Ray kept in the trial's folder (ties -> the later epoch, as
    Ray keeps them), never from the reported history, whose best epoch may have been rotated away.

    A trial is judged on the epochs Tune saw, which ASHA decided on. Train reports to Tune asynchronously (its
    controller polls the workers every 2 s), so a trial with short epochs can train on before ASHA's stop reaches
    it: those epochs are in its ``history.json`` and may have checkpoints, but they count in neither
    ``epochs_run`` nor the choice of the best checkpoint (stopped trials would otherwise be judged on other epochs
    than the scheduler saw).
    """
    metric, mode = config.tune.metric, config.tune.mode
    rows = []
    for result in grid:
        trial_id = str((result.metrics or {}).get("trial_id", ""))
        row = {"trial_id": trial_id,
               **{p.column: v for p in search.PARAMS if (v := result.config.get(p.name)) is not None}}
        frame = result.metrics_dataframe
        if frame is None or frame.empty or metric not in frame:
            rows.append({**row, "epochs_run": 0, "ended": "error" if result.error else "no report"})
            continue
        trial_run = runs.trial_dir(sweep_dir, trial_id)
        epochs_run = int(frame["epoch"].max())
        try:
            checkpoint, meta = runs.best_kept_checkpoint(trial_run, metric, mode, last_epoch=epochs_run)
        except CheckpointError:
            rows.append({**row, "epochs_run": epochs_run, "ended": "no checkpoint"})
            continue
        best = meta["metrics"]
        rows.append({**row, "best_epoch": int(meta["epoch"]), f"best_{metric}": float(best[metric]),
                     "val_loss": float(best["val_loss"]), "val_accuracy": float(best["val_accuracy"]),
                     "val_auc": float(best["val_auc"]), "epochs_run": epochs_run,
                     "ended": _ended(frame, result, config), "checkpoint": checkpoint})
    reverse = mode == "max"
    return sorted(rows, key=lambda r: r.get(f"best_{metric}", -math.inf if reverse else math.inf), reverse=reverse)


def results_table(rows: list[dict], metric: str = "val_accuracy") -> str:
    """The sweep's rows as a plain-text table, best first (what `genderid tune` prints)."""
    params = [p.column for p in search.PARAMS if any(p.column in r for r in rows)]
    columns = ["trial_id", *params, f"best_{metric}", "val_loss", "epochs_run", "ended"]
    lines = [" | ".join(columns)]
    for row in rows:
        lines.append(" | ".join(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                for c in columns))
    return "\n".join(lines)


def write_results(rows: list[dict], config: Config, sweep_dir: str) -> dict:
    """results.csv, sweep.png and best.json under the sweep folder; returns best.json's content."""
    import pandas as pd

    storage.write_bytes(runs.path(sweep_dir, runs.RESULTS_FILE), pd.DataFrame(rows).to_csv(index=False).encode())
    storage.write_bytes(runs.path(sweep_dir, runs.SWEEP_PLOT_FILE), plot_sweep(rows, config.tune.metric))
    finished = [r for r in rows if "checkpoint" in r]
    if not finished:
        raise RuntimeError(f"no trial of sweep {config.storage.name} kept a checkpoint")
    best_row = finished[0]
    return runs.write_best(sweep_dir, "sweep", best_row["checkpoint"], params=search.params_of(best_row),
                           trial_id=best_row["trial_id"])


def _differences(saved, current, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [prefix.rstrip(".")]


def check_resume(config: Config, sweep_dir: str) -> bool:
    """True when ``sweep_dir`` holds a sweep to resume; refuses one that was started with another config.

    A resumed sweep keeps its trials' configs and its search space; applying a changed config to half a sweep
    would make its results table compare unlike trials, so a change is refused instead of half-applied.
    """
    uri = runs.path(sweep_dir, runs.SWEEP_CONFIG_FILE)
    if not storage.exists(uri):
        return False
    saved = json.loads(storage.read_bytes(uri))
    changed = _differences(saved, config.to_dict())
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(f"storage.name: a sweep named {config.storage.name!r} already exists in {sweep_dir} with "
                          f"another config ({shown} differ). Rerun it with the same config to resume it, or "
                          "choose a new storage.name for a new sweep")
    return True


def build_tuner(config: Config, sweep_dir: str, resources: dict, hooks: Optional[TrainHooks] = None,
                callbacks: tuple = ()):
    """A new sweep, or the interrupted one in ``sweep_dir`` (finished trials kept, unfinished ones resumed)."""
    from ray.tune import RunConfig, TuneConfig, Tuner

    from genderid.ray_cleanup import OrphanReaper

    trials_at_once = concurrency(config, resources)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.to_dict(), trials_dir=runs.trials_dir(sweep_dir),
                             hooks=hooks, concurrent_trials=trials_at_once,
                             feature_cache_root=runs.feature_cache_root(config.storage.path)),
        {"CPU": TRIAL_DRIVER_CPU})
    experiment = runs.path(sweep_dir, runs.TUNE_DIR)
    if Tuner.can_restore(experiment):
        return Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=config.tune.max_epochs, grace_period=config.tune.grace_period,
                              reduction_factor=config.tune.reduction_factor)
    return Tuner(
        trainable, param_space=search_space(config),
        # The concurrency goes to the search algorithm itself: Tune ignores max_concurrent_trials (with a warning)
        # once a BasicVariantGenerator instance is given, and trials would then wait on each other's workers.
        tune_config=TuneConfig(metric=config.tune.metric, mode=config.tune.mode, num_samples=config.tune.num_samples,
                               scheduler=scheduler,
                               search_alg=BasicVariantGenerator(random_state=config.tune.seed,
                                                                max_concurrent=trials_at_once)),
        # verbose 0: the sweep's table is printed by us when it ends; --verbose brings Tune's live status back.
        run_config=RunConfig(name=runs.TUNE_DIR, storage_path=sweep_dir,
                             callbacks=[OrphanReaper(), TrialProgress(config.tune.num_samples, config.tune.metric,
                                                                      config.tune.mode), *callbacks],
                             verbose=2 if console.verbose() else 0),
    )


def run_sweep(config: Config, hooks: Optional[TrainHooks] = None) -> tuple[list[dict], dict]:
    """Run (or resume) the sweep; write its results; return the rows and best.json.

    ``hooks`` go to every trial's train loop (instrumentation and fault injection; see :mod:`genderid.train_hooks`).
    """
    import ray

    from genderid.ray_cleanup import release_orphaned_placement_groups, wait_for_dead_jobs_runs
    from genderid.ray_runtime import caller_signal_handlers, init_ray

    check_data_source(config)
    sweep_dir = runs.run_dir_of(config)
    resuming = check_resume(config, sweep_dir)  # before Ray starts: a refused resume costs nothing
    init_ray()
    # A killed earlier run's trials may still be writing into their folders, and what it left reserved would make
    # this one wait forever (see genderid.ray_cleanup).
    wait_for_dead_jobs_runs()
    release_orphaned_placement_groups()
    tracker = tracking.open_tracker(config)
    sweep_run = None
    if tracker is not None:
        sweep_run = tracking.start_run(tracker, sweep_dir, "sweep", config.storage.name,
                                       tracking.flat_params(config.to_dict()))
    # A resumed sweep keeps the callbacks it was started with (Tune restores them); a new one gets the tracker.
    callbacks = () if sweep_run is None else (
        TrialTracker(tracker, config.tracking.experiment, sweep_dir, sweep_run),)
    if config.tune.feature_cache or config.train.feature_cache:
        # Built once, before any trial starts: trials only read them (concurrent trials never build one twice).
        from genderid.feature_cache import frozen_blocks_of
        from genderid.feature_cache_ray import ensure

        ensure(config, runs.feature_cache_root(config.storage.path), frozen_blocks_of(config.tune.unfreeze_depth))
    tuner = build_tuner(config, sweep_dir, ray.cluster_resources(), hooks, callbacks)
    if not resuming:
        storage.write_bytes(runs.path(sweep_dir, runs.SWEEP_CONFIG_FILE),
                            json.dumps(config.to_dict(), indent=2).encode())
    else:
        print(f"[tune] resuming sweep {config.storage.name!r} from {sweep_dir}", flush=True)
    failed = True
    try:
        # silence_prints: Tune's banner and status tables; the results table is printed after.
        with console.silence_prints(), caller_signal_handlers():
            grid = tuner.fit()
        rows = summarise(grid, config, sweep_dir)
        best = write_results(rows, config, sweep_dir)
        failed = False
    finally:
        if sweep_run is not None:
            _finish_tracking(tracker, sweep_run, sweep_dir, rows if not failed else None, failed)
    return rows, best


def _finish_tracking(tracker, sweep_run: str, sweep_dir: str, rows: Optional[list], failed: bool) -> None:
    """The sweep's MLflow run gets its results (table, plot, best.json) and each trial's run its outcome."""
    files = {name: runs.path(sweep_dir, name) for name in (runs.RESULTS_FILE, runs.SWEEP_PLOT_FILE, runs.BEST_FILE)}
    tracking.log_files(tracker, sweep_run, files)
    trial_runs = tracking.trial_runs(tracker, sweep_dir) if rows else {}
    for row in rows or []:
        trial_run = trial_runs.get(row["trial_id"])
        if trial_run is not None:
            tracker.client().set_tag(trial_run, "ended", row.get("ended", ""))
            if "checkpoint" in row:
                tracker.client().set_tag(trial_run, "best_checkpoint", row["checkpoint"])
    tracking.finish_run(tracker, sweep_run, failed)
