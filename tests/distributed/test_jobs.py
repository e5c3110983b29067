"""Ray Jobs: training and a sweep submitted with `ray job submit` to the session's `ray start --head` cluster."""
import json
import uuid

import pytest

from conftest import REPO

pytestmark = pytest.mark.ray


def submit(cluster, script, *args):
    """`ray job submit` a jobs/ script with the repo as working dir; returns its output and `ray job status`."""
    submission = f"genderid-{uuid.uuid4().hex[:8]}"
    run = cluster.ray_cli(
        "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission,
        "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
        "python", script, "--config", "jobs/configs/tiny.yaml", *args, timeout=900, check=False)
    status = cluster.ray_cli("job", "status", "--address", cluster.dashboard_url, submission)
    assert "succeeded" in status.stdout.lower(), run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_train_job_via_ray_job_submit(local_cluster, prepared, tmp_path):
    runs = tmp_path / "runs"
    output = submit(local_cluster, "jobs/train.py", f"data.source={prepared / 'prepared'}", f"storage.path={runs}",
                    "storage.name=job", "train.epochs=2")
    best = json.loads((runs / "job" / "best.json").read_text())
    assert best["checkpoint"].startswith(str(runs / "job" / "checkpoint_"))
    assert [h["epoch"] for h in json.loads((runs / "job" / "history.json").read_text())] == [1, 2]
    assert "[train] epoch 2/2" in output and "accuracy" in output


def test_tune_job_via_ray_job_submit(local_cluster, prepared, tmp_path):
    sweeps = tmp_path / "sweeps"
    output = submit(local_cluster, "jobs/tune.py", f"data.source={prepared / 'prepared'}", f"storage.path={sweeps}",
                    "storage.name=job-sweep", "tune.num_samples=2", "tune.max_epochs=2", "tune.unfreeze_depth=[5]")
    with open(sweeps / "job-sweep" / "results.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 3  # header + one row per trial
    best = json.loads((sweeps / "job-sweep" / "best.json").read_text())
    assert best["checkpoint"].startswith(str(sweeps / "job-sweep" / "trials"))
    assert "best trial checkpoint:" in output
