"""Ray Tune sweeps on the shared cluster: tiny config, 2-worker Train runs per trial."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, submit_job
from genderid.checkpoint import read_meta
from genderid.config import load_config, named_config_path
from genderid.predictor import Predictor
from genderid.tune_ray import default_concurrency

pytestmark = pytest.mark.ray


def sweep_overrides(prepared, tmp_path, name):
    return [f"data.source={prepared / 'prepared'}", f"storage.path={tmp_path / 'sweeps'}", f"storage.name={name}",
            "tune.num_samples=4", "tune.max_epochs=3", "tune.grace_period=1", "tune.reduction_factor=2",
            "tune.lr=[0.0001, 0.03]", "tune.unfreeze_depth=[1, 5]", "train.early_stopping_patience=0"]


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_default_concurrency_leaves_a_cpu_for_ray_data():
    config = load_config(named_config_path("tiny"))  # 2 workers x 0.45 CPU + 0.01 for the trial driver
    assert default_concurrency(config, {"CPU": 2}) == 1
    assert default_concurrency(config, {"CPU": 8}) == 7
    gpu = load_config(named_config_path("celeba-vgg16"), ["scaling.num_workers=2"])
    assert default_concurrency(gpu, {"CPU": 64, "GPU": 8}) == 4
    with pytest.raises(ValueError, match="scaling"):
        default_concurrency(gpu, {"CPU": 4, "GPU": 8})


def test_sweep_job_with_asha_writes_results_and_a_loadable_best(local_cluster, prepared, tmp_path):
    output = submit_job(local_cluster, "jobs/tune.py", *sweep_overrides(prepared, tmp_path, "sweep"))
    assert "best trial checkpoint:" in output and "trial_id | config/lr" in output
    sweep = tmp_path / "sweeps" / "sweep"
    best = json.loads((sweep / "best.json").read_text())
    table = read_rows(sweep / "results.csv")
    assert len(table) == 4 and {r["config/unfreeze_depth"] for r in table} <= {"1", "5"}
    assert all(r["ended"] in ("completed", "stopped by ASHA") for r in table)
    assert any(r["ended"] == "stopped by ASHA" and int(r["epochs_run"]) < 3 for r in table)
    top = max(float(r["best_val_accuracy"]) for r in table)
    assert best["metrics"]["best_val_accuracy"] == pytest.approx(top)
    assert read_meta(best["checkpoint"])["metrics"]["val_accuracy"] == pytest.approx(top)
    assert Predictor.from_checkpoint(str(sweep / "best.json")).model_version
    assert (sweep / "sweep.png").stat().st_size > 1000


def release_orphaned_placement_groups():
    """What an operator does after SIGKILLing a sweep driver on Ray 2.60 (see README, "Tune sweeps").

    The killed run's Train worker placement group can stay reserved (Train V2's cleaner dies with its driver), and
    the rerun would then wait for CPUs forever. No other run is active here, so every live group is an orphan.
    """
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup

    for group_id, info in placement_group_table().items():
        if info["state"] == "CREATED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(local_cluster, ray_cluster, prepared, tmp_path):
    overrides = sweep_overrides(prepared, tmp_path, "resume") + ["tune.num_samples=2", "tune.max_epochs=2"]
    command = [sys.executable, "-m", "genderid", "tune", "--config", str(named_config_path("tiny")), *overrides]
    env = {**local_cluster.env(), "RAY_ADDRESS": local_cluster.address, "PYTHONUNBUFFERED": "1"}
    trials = tmp_path / "sweeps" / "resume" / "trials"
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 600
    finished = set()
    while time.time() < deadline and not finished:  # wait for one trial to finish, then kill the driver
        time.sleep(2)
        for history in trials.glob("*/history.json"):
            epochs = json.loads(history.read_text())
            if epochs and (epochs[-1]["epoch"] == 2 or epochs[-1]["early_stopped"]):
                finished.add(history.parent.name)
        assert first.poll() is None or finished, "the sweep ended before it could be interrupted"
    time.sleep(15)  # let Tune record the trial as finished in its experiment state
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert finished, "no trial finished in time"
    release_orphaned_placement_groups()
    done_before = {t: (trials / t / "history.json").stat().st_mtime for t in finished}
    time.sleep(2)

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = read_rows(tmp_path / "sweeps" / "resume" / "results.csv")
    assert len(rows) == 2
    for trial, mtime in done_before.items():  # finished trials were not trained again
        assert (trials / trial / "history.json").stat().st_mtime == mtime
