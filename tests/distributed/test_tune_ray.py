"""Ray Tune sweeps on the shared cluster: tiny config, 2-worker Train runs per trial."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, mlflow_runs, submit_job
from genderid.checkpoint import read_meta
from genderid.config import ConfigError, load_config, named_config_path
from genderid.predictor import Predictor
from genderid.tune_ray import concurrency, default_concurrency

pytestmark = pytest.mark.ray


def sweep_overrides(prepared, tmp_path, name):
    return [f"data.source={prepared / 'prepared'}", f"storage.path={tmp_path / 'sweeps'}", f"storage.name={name}",
            "tune.num_samples=4", "tune.max_epochs=3", "tune.grace_period=1", "tune.reduction_factor=2",
            "tune.lr=[0.0001, 0.03]", "tune.unfreeze_depth=[1, 5]", "train.early_stopping_patience=0"]


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_default_concurrency_leaves_a_cpu_for_ray_data_and_is_never_zero():
    config = load_config(named_config_path("tiny"))  # 2 workers x 0.45 CPU + 0.01 for the trial driver
    assert default_concurrency(config, {"CPU": 2}) == 1
    assert default_concurrency(config, {"CPU": 8}) == 7
    gpu = load_config(named_config_path("celeba-vgg16"), ["scaling.num_workers=2", "scaling.cpus_per_worker=4"])
    assert default_concurrency(gpu, {"CPU": 64, "GPU": 8}) == 4
    with pytest.raises(ConfigError, match="scaling"):
        default_concurrency(gpu, {"CPU": 4, "GPU": 8})
    # A head node of a cluster whose GPU workers autoscale from zero: no GPU exists yet. Never 0 trials: a clear
    # error that names the key to set, and with that key set the sweep runs without looking at resources.
    with pytest.raises(ConfigError, match=r"tune.max_concurrent_trials: .* has 8 CPU\(s\) and 0 GPU"):
        concurrency(gpu, {"CPU": 8})
    pinned = load_config(named_config_path("celeba-vgg16"), ["tune.max_concurrent_trials=3"])
    assert concurrency(pinned, {"CPU": 8}) == 3


def test_sweep_job_with_asha_writes_results_and_a_loadable_best(local_cluster, prepared, tmp_path):
    output = submit_job(local_cluster, "jobs/tune.py", *sweep_overrides(prepared, tmp_path, "sweep"))
    assert "best trial checkpoint:" in output and "trial_id | config/lr" in output
    sweep = tmp_path / "sweeps" / "sweep"
    best = json.loads((sweep / "best.json").read_text())
    table = read_rows(sweep / "results.csv")
    assert len(table) == 4 and {r["config/unfreeze_depth"] for r in table} <= {"1", "5"}
    assert all(r["ended"] in ("completed", "stopped by ASHA") for r in table)
    # On 2 CPUs one trial's Train workers take what Ray Data leaves: the sweep runs one trial at a time (a sweep
    # that ignored its concurrency limit would start all four and starve them). MLflow saw each trial's span.
    _, trial_runs = mlflow_runs(tmp_path / "sweeps", "trial")
    spans = sorted((r.info.start_time, r.info.end_time) for r in trial_runs)
    assert len(spans) == 4 and all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    # Replay ASHA's rule (grace 1, reduction 2, max 3 epochs: rungs at epochs 1 and 2; stop below the median of
    # the values recorded at that rung so far) over the trials in the order they ran (one at a time here).
    # Which trials it stops depends on the sampled lrs; that each decision follows the rule does not.
    recorded, expected = {1: [], 2: []}, {}
    for row in sorted(table, key=lambda r: r["trial_id"]):
        history = json.loads((sweep / "trials" / row["trial_id"] / "history.json").read_text())
        expected[row["trial_id"]] = (3, "completed")
        for h in history:
            if h["epoch"] in recorded:
                rung = recorded[h["epoch"]]
                stop = bool(rung) and h["val_accuracy"] < float(np.nanpercentile(rung, 50))
                rung.append(h["val_accuracy"])
                if stop:
                    expected[row["trial_id"]] = (h["epoch"], "stopped by ASHA")
                    break
    assert {r["trial_id"]: (int(r["epochs_run"]), r["ended"]) for r in table} == expected
    top = max(float(r["best_val_accuracy"]) for r in table)
    assert best["kind"] == "sweep" and best["metrics"]["val_accuracy"] == pytest.approx(top)
    winner = next(r for r in table if r["trial_id"] == best["trial_id"])
    assert best["params"] == {"lr": float(winner["config/lr"]), "unfreeze_depth": int(winner["config/unfreeze_depth"])}
    assert best["config"]["model"]["unfreeze_depth"] == best["params"]["unfreeze_depth"]
    assert read_meta(best["checkpoint"])["metrics"]["val_accuracy"] == pytest.approx(top)
    assert Predictor.from_checkpoint(str(sweep / "best.json")).model_version
    assert (sweep / "sweep.png").stat().st_size > 1000
    # MLflow: the sweep's run holds its results; one nested run per trial with the searched params and its
    # per-epoch val_accuracy, exactly what the trial's own history says for the epochs Tune saw (ASHA-stopped
    # trials: fewer epochs). Train reports to Tune asynchronously (its controller polls every 2 s), so with ~1 s
    # epochs a stopped trial may train past the stop: those epochs are in history.json only, never in the sweep's
    # records or its choice of best.
    client, [sweep_run] = mlflow_runs(tmp_path / "sweeps", "sweep")
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} == {"results.csv", "sweep.png", "best.json"}
    _, trial_runs = mlflow_runs(tmp_path / "sweeps", "trial")
    assert len(trial_runs) == 4
    by_trial = {r.data.tags["genderid.trial_id"]: r for r in trial_runs}
    assert set(by_trial) == {r["trial_id"] for r in table}
    for row in table:
        run = by_trial[row["trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
        # The sweep's end tags each trial's run with its outcome and best checkpoint (tracking.trial_runs).
        assert run.data.tags["ended"] == row["ended"]
        assert run.data.tags.get("best_checkpoint", "") == row.get("checkpoint", "")
        assert float(run.data.params["lr"]) == pytest.approx(float(row["config/lr"]))
        assert run.data.params["unfreeze_depth"] == row["config/unfreeze_depth"]
        history = json.loads((sweep / "trials" / row["trial_id"] / "history.json").read_text())
        epochs_run = int(row["epochs_run"])
        assert [h["epoch"] for h in history][:epochs_run] == list(range(1, epochs_run + 1))
        assert len(history) == epochs_run or row["ended"] == "stopped by ASHA"
        logged = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [(m.step, m.value) for m in logged] == [(h["epoch"], pytest.approx(h["val_accuracy"]))
                                                       for h in history[:epochs_run]]
        assert int(row["best_epoch"]) <= epochs_run


def test_a_sweep_whose_val_accuracy_ties_names_a_checkpoint_that_exists(ray_cluster, prepared, tmp_path):
    """Ray keeps the later of tied checkpoints and deletes the earlier: best.json must name the one kept.

    The trial trains on no batch (a test hook), so its weights and BatchNorm statistics never change and every
    epoch's val accuracy is the same: the case where "the first epoch reaching the best value" is deleted.
    """
    from genderid.train_hooks import NoTrainSteps
    from genderid.tune_ray import run_sweep

    config = load_config(named_config_path("tiny"), sweep_overrides(prepared, tmp_path, "ties") + [
        "tune.num_samples=1", "tune.max_epochs=3", "tune.grace_period=3", "train.keep_checkpoints=1"])
    assert config.tune.metric == "val_accuracy"
    handler = signal.getsignal(signal.SIGINT)
    rows, best = run_sweep(config, hooks=NoTrainSteps())
    # Also: Tune's fit() leaves its Ctrl-C handler behind (Ray 2.60); run_sweep gives the caller back its own.
    assert signal.getsignal(signal.SIGINT) is handler
    trial = tmp_path / "sweeps" / "ties" / "trials" / rows[0]["trial_id"]
    history = json.loads((trial / "history.json").read_text())
    assert len(history) == 3 and len({h["val_accuracy"] for h in history}) == 1  # tied at every epoch
    kept = [p for p in trial.glob("checkpoint_*") if (p / "meta.json").exists()]
    assert read_meta(best["checkpoint"])["epoch"] == 3  # ties -> the latest, which is what Ray kept
    assert best["checkpoint"] in {str(p) for p in kept}
    assert Predictor.from_checkpoint(str(tmp_path / "sweeps" / "ties" / "best.json")).model_version


def registered_epochs(trial_run):
    """The epochs whose checkpoints Ray Train has registered (what a resumed run can restore from)."""
    try:
        snapshot = json.loads((trial_run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [r["metrics"]["epoch"] for r in snapshot.get("checkpoint_results", [])]


def tune_finished_trials(sweep):
    """The trials that Tune's saved experiment state records as finished (what a resumed sweep will not rerun)."""
    states = sorted((sweep / "tune").glob("experiment_state-*.json"))
    try:
        saved = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError):  # being written
        return set()
    trials = [json.loads(state) if isinstance(state, str) else state for state, _ in saved]
    return {t["trial_id"] for t in trials if t.get("status") == "TERMINATED"}


# A driver that runs the same sweep as `genderid tune` does, with a hook that holds the second trial at epoch 2.
HELD_SWEEP = """
import sys
from genderid.config import load_config, named_config_path
from genderid.train_hooks import HoldLaterRuns
from genderid.tune_ray import run_sweep
run_sweep(load_config(named_config_path("tiny"), sys.argv[2:]), hooks=HoldLaterRuns(2, sys.argv[1]))
"""


def test_a_killed_sweep_resumes_its_own_trials_from_their_checkpoints(local_cluster, prepared, tmp_path):
    """SIGKILL the driver between trials, rerun the same command: no hand-run cleanup, no fresh sweep."""
    # No ASHA stop: both trials run 2 epochs, one after the other. The first run's second trial is held at the start
    # of epoch 2 (a test hook), so the kill lands between its checkpointed epoch 1 and its epoch 2 every time.
    overrides = sweep_overrides(prepared, tmp_path, "resume") + [
        "tune.num_samples=2", "tune.max_epochs=2", "tune.grace_period=2", "tune.max_concurrent_trials=1"]
    command = [sys.executable, "-m", "genderid", "tune", "--config", str(named_config_path("tiny")), *overrides]
    env = {**local_cluster.env(), "RAY_ADDRESS": local_cluster.address, "PYTHONUNBUFFERED": "1"}
    sweep = tmp_path / "sweeps" / "resume"
    trials, markers = sweep / "trials", tmp_path / "markers"
    markers.mkdir()
    first = subprocess.Popen([sys.executable, "-c", HELD_SWEEP, str(markers), *overrides], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, histories, finished, interrupted = time.time() + 600, {}, set(), set()
    while time.time() < deadline:  # one trial finished (and saved so by Tune), the next one held after epoch 1
        time.sleep(1)
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        histories = {p.parent.name: json.loads(p.read_text()) for p in trials.glob("*/history.json")}
        finished = {t for t, h in histories.items() if h and h[-1]["epoch"] == 2}
        interrupted = {t for t, h in histories.items() if h and h[-1]["epoch"] == 1 and registered_epochs(trials / t)}
        if finished and finished <= tune_finished_trials(sweep) and interrupted and list(markers.glob("held-*")):
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert len(finished) == 1 and len(interrupted) == 1, histories
    [done], [cut] = finished, interrupted
    done_before = (trials / done / "history.json").read_text()

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "resuming sweep 'resume'" in second.stdout
    rows = {r["trial_id"]: r for r in read_rows(tmp_path / "sweeps" / "resume" / "results.csv")}
    assert set(rows) == {done, cut}  # the same trials: a fresh sweep would have new trial ids
    assert (trials / done / "history.json").read_text() == done_before  # the finished trial did not run again
    done_history = json.loads(done_before)
    assert float(rows[done]["best_val_accuracy"]) == pytest.approx(max(h["val_accuracy"] for h in done_history))
    resumed = json.loads((trials / cut / "history.json").read_text())
    assert [h["epoch"] for h in resumed] == [1, 2]
    assert [h["start_epoch"] for h in resumed] == [1, 2]  # epoch 2 ran after resuming from epoch 1's checkpoint
    assert resumed[0] == histories[cut][0]
    # MLflow after the resume: still one run per trial; the cut trial's run holds epoch 1 (logged before the kill,
    # or from its checkpoint's history when its report was lost with the driver) and epoch 2 (after the resume),
    # once each and in order.
    client, trial_runs = mlflow_runs(tmp_path / "sweeps", "trial")
    by_trial = {r.data.tags["genderid.trial_id"]: r for r in trial_runs}
    assert len(trial_runs) == 2 and set(by_trial) == {done, cut}
    logged = client.get_metric_history(by_trial[cut].info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in logged] == [(h["epoch"], pytest.approx(h["val_accuracy"])) for h in resumed]
    assert len(mlflow_runs(tmp_path / "sweeps", "sweep")[1]) == 1

    # The same name with another config is refused at once, naming the keys, before any work starts.
    changed = subprocess.run(command + ["train.weight_decay=0.01"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    assert changed.returncode == 2
    assert changed.stderr.count("\n") == 1 and "train.weight_decay differ" in changed.stderr
    assert "Traceback" not in changed.stderr
