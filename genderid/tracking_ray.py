"""Ray glue for MLflow tracking: epochs go to MLflow as Ray reports them, on Ray's driver-side processes.

Both callbacks run where Ray collects reports (the Tune driver; the Train controller, which Ray 2.60 attaches to
the driver's node), never in the training workers: the tracking store needs to be reachable from the driver's
node only, and a worker's restart cannot log twice.
The store, the runs and their tags are :mod:`genderid.tracking`'s.
"""
from __future__ import annotations

import ray.train
from ray.air.integrations.mlflow import MLflowLoggerCallback

from genderid import runs, tracking


class TrialTracker(MLflowLoggerCallback):
    """Ray Tune's MLflow logger, one MLflow run per trial nested under the sweep's run.

    On top of Ray's: a trial's run is found again when a sweep resumes (no second run per trial), metrics are
    logged at step = our epoch (Tune's iteration count restarts at 0 after a resume), and only the epoch curves
    are logged, not Tune's bookkeeping. A trial's run holds the epochs Tune saw (its ``history.json`` may hold
    one more, trained after the scheduler stopped it), plus those a resumed trial restored from its checkpoint.
    """

    def __init__(self, tracker: tracking.Tracker, experiment_name: str, sweep_dir: str, sweep_run_id: str):
        super().__init__(tracking_uri=tracker.uri, experiment_name=experiment_name)
        self.tracker, self.sweep_dir, self.sweep_run_id = tracker, sweep_dir, sweep_run_id

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            self._trial_runs[trial] = tracking.start_run(
                self.tracker, self.sweep_dir, "trial", f"trial {trial.trial_id}", params={},
                parent_run_id=self.sweep_run_id, trial_id=trial.trial_id)
        super().log_trial_start(trial)  # Ray's: the trial's config (the searched params) as params

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if "epoch" in result:
            tracking.log_epoch(self.tracker, self._trial_runs[trial], result, history=self._history(trial))

    def _history(self, trial) -> str:
        return runs.path(runs.trial_dir(self.sweep_dir, trial.trial_id), runs.HISTORY_FILE)


class EpochTracker(ray.train.UserCallback):
    """Each epoch of a Ray Train run into its MLflow run, from the Train controller as rank 0 reports it."""

    def __init__(self, tracker: tracking.Tracker, run_id: str, history: str):
        self.tracker, self.run_id, self.history = tracker, run_id, history

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and "epoch" in metrics[0]:
            tracking.log_epoch(self.tracker, self.run_id, metrics[0], history=self.history)
