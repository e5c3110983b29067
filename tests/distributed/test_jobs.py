"""Ray Jobs: the tiny training job submitted with `ray job submit` to the session's `ray start --head` cluster."""
import json
import uuid

import pytest

from conftest import REPO

pytestmark = pytest.mark.ray


def test_train_job_via_ray_job_submit(local_cluster, prepared, tmp_path):
    submission = f"genderid-train-{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    submit = local_cluster.ray_cli(
        "job", "submit", "--address", local_cluster.dashboard_url, "--submission-id", submission,
        "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
        "python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml", f"data.source={prepared / 'prepared'}",
        f"storage.path={runs}", "storage.name=job", "train.epochs=2", timeout=900, check=False)
    status = local_cluster.ray_cli("job", "status", "--address", local_cluster.dashboard_url, submission)
    assert "succeeded" in status.stdout.lower(), submit.stdout[-3000:] + submit.stderr[-3000:]
    best = json.loads((runs / "job" / "best.json").read_text())
    assert best["checkpoint"].startswith(str(runs / "job" / "checkpoint_"))
    assert [h["epoch"] for h in json.loads((runs / "job" / "history.json").read_text())] == [1, 2]
    assert "[train] epoch 2/2" in submit.stdout and "accuracy" in submit.stdout


def test_tune_job_via_ray_job_submit(local_cluster, prepared, tmp_path):
    submission = f"genderid-tune-{uuid.uuid4().hex[:8]}"
    sweeps = tmp_path / "sweeps"
    submit = local_cluster.ray_cli(
        "job", "submit", "--address", local_cluster.dashboard_url, "--submission-id", submission,
        "--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"), "--",
        "python", "jobs/tune.py", "--config", "jobs/configs/tiny.yaml", f"data.source={prepared / 'prepared'}",
        f"storage.path={sweeps}", "storage.name=job-sweep", "tune.num_samples=2", "tune.max_epochs=2",
        "tune.unfreeze_depth=[5]", timeout=900, check=False)
    status = local_cluster.ray_cli("job", "status", "--address", local_cluster.dashboard_url, submission)
    assert "succeeded" in status.stdout.lower(), submit.stdout[-3000:] + submit.stderr[-3000:]
    with open(sweeps / "job-sweep" / "results.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 3  # header + one row per trial
    best = json.loads((sweeps / "job-sweep" / "best.json").read_text())
    assert best["checkpoint"].startswith(str(sweeps / "job-sweep" / "trials"))
    assert "best trial checkpoint:" in submit.stdout
