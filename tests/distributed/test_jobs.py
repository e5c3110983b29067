"""Ray Jobs: training submitted with `ray job submit` to the session's `ray start --head` cluster.

(The sweep job is submitted by tests/distributed/test_tune_ray.py.)
"""
import json

import pytest

from conftest import submit_job
from genderid.config import load_config, named_config_path
from genderid.train_ray import run_training

pytestmark = pytest.mark.ray


def test_train_job_via_ray_job_submit_and_rerunning_its_name_resumes(local_cluster, ray_cluster, prepared,
                                                                    tmp_path):
    runs = tmp_path / "runs"
    overrides = [f"data.source={prepared / 'prepared'}", f"storage.path={runs}", "storage.name=job",
                 "train.early_stopping_patience=0", "train.keep_checkpoints=3"]
    output = submit_job(local_cluster, "jobs/train.py", *overrides, "train.epochs=2")
    best = json.loads((runs / "job" / "best.json").read_text())
    assert best["checkpoint"].startswith(str(runs / "job" / "checkpoint_"))
    assert [h["epoch"] for h in json.loads((runs / "job" / "history.json").read_text())] == [1, 2]
    assert "[train] epoch 2/2" in output and "accuracy" in output

    # The same name again, with more epochs: it resumes from the job's last checkpoint instead of starting over.
    run_training(load_config(named_config_path("tiny"), [*overrides, "train.epochs=3"]))
    final = json.loads((runs / "job" / "history.json").read_text())
    assert [h["epoch"] for h in final] == [1, 2, 3] and final[-1]["start_epoch"] == 3
