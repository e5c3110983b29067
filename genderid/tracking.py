"""Experiment tracking with MLflow: where the store is, and the MLflow runs of sweeps and train runs. No Ray here.

Every sweep is one MLflow run (its config, results table, plot and ``best.json``) with one nested run per trial
(the searched params, every epoch's metrics); every train run is one MLflow run (its config, every epoch's metrics,
``best.json``, its history and, once evaluated, the report and plots). The Ray side, which feeds epochs in as they
are reported, is :mod:`genderid.tracking_ray`.

Where it goes (``tracking`` in the config): ``tracking.uri`` names a tracking server (or any MLflow store URI);
left empty, a local store under ``storage.path`` needs no server: ``mlflow.db`` (SQLite, MLflow's embedded backend
since its plain-file backend went into maintenance mode) and the artifacts in ``mlartifacts/``. Browse it with
``mlflow ui --backend-store-uri sqlite:///<storage.path>/mlflow.db`` (:func:`ui_command`). An ``s3://``
``storage.path`` has no local store: there tracking needs ``tracking.uri`` and is off without it.

MLflow runs are found again by the tag :data:`TAG_RUN_DIR` (the run or sweep folder), so a resumed sweep or run
goes on logging into the MLflow run it started, never a second one.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from genderid import console, storage
from genderid.errors import UserError

STORE_FILE = "mlflow.db"  # under storage.path: the local store's SQLite file
ARTIFACTS_DIR = "mlartifacts"  # under storage.path: the local store's artifacts
TAG_RUN_DIR = "genderid.run_dir"  # the run or sweep folder an MLflow run belongs to
TAG_KIND = "genderid.kind"  # train | sweep | trial
TAG_TRIAL = "genderid.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: nests a trial's run under its sweep's in the UI
# What an epoch report holds that is worth a curve (the rest is bookkeeping: epoch counters, image counts).
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_auc",
                 "images_per_s", "epoch_seconds")
_QUIET_LOGGERS = ("mlflow", "alembic")  # their INFO lines (creating tables, migrations) stay off the console


class TrackingError(UserError):
    """The tracking store cannot be opened (a server that does not answer, a URI MLflow does not know)."""


@dataclass(frozen=True)
class Tracker:
    """An opened tracking store and the experiment to log into."""

    uri: str
    experiment_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def store_uri(config) -> Optional[str]:
    """The MLflow tracking URI for ``config``, or None when tracking is off (or has nowhere local to go)."""
    if not config.tracking.enabled:
        return None
    if config.tracking.uri:
        return config.tracking.uri
    if storage.is_remote(config.storage.path):
        return None
    return f"sqlite:///{os.path.abspath(os.path.join(config.storage.path, STORE_FILE))}"


def ui_command(config) -> Optional[str]:
    """The ``mlflow ui`` command that shows this config's runs (None when there is nothing local to show)."""
    uri = store_uri(config)
    return None if uri is None or config.tracking.uri else f"mlflow ui --backend-store-uri {uri}"


def open_tracker(config) -> Optional[Tracker]:
    """The store and experiment (created on first use) for ``config``; None when tracking is off.

    Errors here are the user's to fix before any training starts (a wrong ``tracking.uri``), so they raise a
    :class:`TrackingError` naming the URI; errors later, while epochs are logged, only warn (see
    :func:`log_epoch`): a tracking hiccup never costs a training run.
    """
    uri = store_uri(config)
    if uri is None:
        if config.tracking.enabled and not config.tracking.uri:
            print(f"[tracking] off: storage.path {config.storage.path} is remote and tracking.uri is not set",
                  flush=True)
        return None
    _quiet_mlflow_logs()
    artifacts = None
    if not config.tracking.uri:
        root = os.path.abspath(config.storage.path)
        os.makedirs(root, exist_ok=True)
        artifacts = Path(root, ARTIFACTS_DIR).as_uri()
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         client.create_experiment(config.tracking.experiment, artifact_location=artifacts))
    except Exception as exc:  # MLflow raises many kinds (connection, schema, URI scheme): all mean the same here
        raise TrackingError(f"tracking.uri: cannot open MLflow store {uri}: {str(exc).splitlines()[0][:300]}") from None
    return Tracker(uri=uri, experiment_id=experiment_id)


def _quiet_mlflow_logs() -> None:
    if not console.verbose():
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def flat_params(values: dict, prefix: str = "") -> dict:
    """A nested config as MLflow params: dotted keys (the same keys as the CLI's overrides), values as text."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def find_run(tracker: Tracker, run_dir: str, kind: Optional[str] = None, trial_id: Optional[str] = None):
    """The MLflow run id logged for the run or sweep folder ``run_dir`` (a trial: its ``trial_id``), or None."""
    found = tracker.client().search_runs([tracker.experiment_id], _run_filter(run_dir, kind, trial_id),
                                         max_results=1, order_by=["attributes.start_time ASC"])
    return found[0].info.run_id if found else None


def _run_filter(run_dir: str, kind: Optional[str] = None, trial_id: Optional[str] = None) -> str:
    """MLflow's search filter for the runs of ``run_dir`` (of that ``kind``, that ``trial_id``)."""
    query = [f"tags.`{TAG_RUN_DIR}` = '{_quoted(run_dir)}'"]
    if kind:
        query.append(f"tags.`{TAG_KIND}` = '{kind}'")
    if trial_id:
        query.append(f"tags.`{TAG_TRIAL}` = '{_quoted(trial_id)}'")
    return " and ".join(query)


def trial_runs(tracker: Tracker, sweep_dir: str, page_size: int = 1000) -> dict[str, str]:
    """Each trial of the sweep folder ``sweep_dir`` -> its MLflow run id (the first logged, as :func:`find_run`
    finds it), in one paged search: not one search per trial, each of which a file store answers by reading every
    run of the experiment."""
    found, token = {}, None
    while True:
        page = tracker.client().search_runs([tracker.experiment_id], _run_filter(sweep_dir, "trial"),
                                            max_results=page_size,
                                            order_by=["attributes.start_time ASC"], page_token=token)
        for run in page:
            found.setdefault(run.data.tags.get(TAG_TRIAL, ""), run.info.run_id)
        token = page.token
        if not token:
            return found


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def start_run(tracker: Tracker, run_dir: str, kind: str, name: str, params: dict,
              parent_run_id: Optional[str] = None, trial_id: Optional[str] = None) -> str:
    """The MLflow run of ``run_dir`` (resumed when it exists, else created, with ``params``); returns its id."""
    client = tracker.client()
    run_id = find_run(tracker, run_dir, kind, trial_id)
    if run_id is None:
        tags = {TAG_RUN_DIR: run_dir, TAG_KIND: kind}
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        if trial_id:
            tags[TAG_TRIAL] = trial_id
        run_id = client.create_run(tracker.experiment_id, tags=tags, run_name=name).info.run_id
        _log_params(client, run_id, params)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def backfill(tracker: Tracker, run_id: str, history: str, before_epoch: Optional[int] = None) -> None:
    """Log the epochs of ``history`` (a run's ``history.json``) that the MLflow run does not have yet, only those
    before ``before_epoch`` when given."""
    try:
        epochs = json.loads(storage.read_bytes(history)) if storage.exists(history) else []
    except (OSError, ValueError):
        return
    logged = {m.step for m in tracker.client().get_metric_history(run_id, "val_loss")}  # every epoch reports it
    for report in epochs if isinstance(epochs, list) else []:
        if not (isinstance(report, dict) and isinstance(report.get("epoch"), int)) or report["epoch"] in logged:
            continue
        if before_epoch is None or report["epoch"] < before_epoch:
            log_epoch(tracker, run_id, report)


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start:start + 100])


def epoch_metrics(report: dict) -> dict:
    """The curves of one epoch's report (:data:`EPOCH_METRICS` present in it, as floats)."""
    return {k: float(report[k]) for k in EPOCH_METRICS if isinstance(report.get(k), (int, float))}


def log_epoch(tracker: Tracker, run_id: str, report: dict, history: Optional[str] = None) -> None:
    """One epoch's metrics, at step = the epoch; a failure warns once per call and training goes on.

    ``history``: the run's ``history.json``. The first report of a resumed run (``epoch == start_epoch > 1``) first
    logs the epochs it restored from its checkpoint that MLflow lacks (a driver killed hard can lose a report after
    Ray registered its checkpoint); by then the resumed run has rewritten ``history.json`` from that checkpoint.
    The epochs after the checkpoint are not taken from an older ``history.json``: a killed run's worker can write
    an epoch whose checkpoint Ray never registered, and the resumed run trains that epoch again and reports it.
    """
    from mlflow.entities import Metric

    try:
        step, start = int(report["epoch"]), report.get("start_epoch")
        if history is not None and isinstance(start, int) and 1 < start == step:
            backfill(tracker, run_id, history, before_epoch=start)
        now = int(time.time() * 1000)  # after the backfill: MLflow orders a metric's history by time, then step
        tracker.client().log_batch(run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in epoch_metrics(report).items()])
    except Exception as exc:  # see open_tracker: never fail training over tracking
        logging.getLogger(__name__).warning("MLflow: could not log epoch %s: %s", report.get("epoch"), exc)


def log_files(tracker: Tracker, run_id: str, files: dict, folder: Optional[str] = None) -> None:
    """Artifacts from storage (``{artifact name: local path or s3:// URI}``; missing ones are skipped)."""
    client = tracker.client()
    with tempfile.TemporaryDirectory() as staging:
        for name, uri in files.items():
            if not storage.exists(uri):
                continue
            local = Path(staging, name)
            local.write_bytes(storage.read_bytes(uri))
            client.log_artifact(run_id, str(local), folder)


def log_folder(tracker: Tracker, run_id: str, folder: str, artifact_path: str) -> None:
    """A local folder (a report) as artifacts; a remote one is recorded as a tag with its location."""
    client = tracker.client()
    if storage.is_remote(folder):
        client.set_tag(run_id, f"genderid.{artifact_path}", folder)
    else:
        client.log_artifacts(run_id, folder, artifact_path)


def finish_run(tracker: Tracker, run_id: str, failed: bool = False, tags: Optional[dict] = None) -> None:
    client = tracker.client()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_report(config, report_dir: str) -> None:
    """The evaluation report of ``config``'s train run (report.json, plots, model card) into its MLflow run."""
    from genderid import runs

    tracker = open_tracker(config)
    run_id = None if tracker is None else find_run(tracker, runs.run_dir_of(config), "train")
    if run_id is not None:
        log_folder(tracker, run_id, report_dir, "report")
