"""The run layout and best.json (pure), the searched-parameter table, and the cluster checks' pure parts."""
import json

import pytest
import torch

from genderid import runs, search
from genderid.checkpoint import CheckpointError, save_checkpoint
from genderid.config import ConfigError, load_config, named_config_path
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing


def fake_run(tmp_path, metrics_by_epoch, kept):
    """A train run folder holding checkpoints of the ``kept`` epochs (what Ray left), with their metrics."""
    run = tmp_path / "run"
    model = GenderNet(width=0.0625, batch_norm=True).eval()
    for epoch in kept:
        save_checkpoint(run / f"checkpoint_2026-01-01_00-00-{epoch:02d}.000000", model,
                        preprocessing=Preprocessing(image_size=(32, 32)), metrics=metrics_by_epoch[epoch], epoch=epoch)
    (run / "checkpoint_unfinished").mkdir()  # no meta.json: still being written
    return run


def test_ties_go_to_the_latest_epoch_which_is_the_one_ray_kept(tmp_path):
    metrics = {1: {"val_accuracy": 0.9}, 2: {"val_accuracy": 0.9}, 3: {"val_accuracy": 0.8}}
    # keep_checkpoints=1 with Ray's tie rule: epoch 1 was deleted, epoch 2 kept (best), epoch 3 kept (latest).
    run = fake_run(tmp_path, metrics, kept=(2, 3))
    location, meta = runs.best_kept_checkpoint(str(run), "val_accuracy", "max")
    assert meta["epoch"] == 2 and location.endswith("-02.000000")
    candidates = [(f"c{e}", {"metrics": m, "epoch": e}) for e, m in metrics.items()]
    assert runs.pick_best(candidates, "val_accuracy", "max")[0] == "c2"  # the later of the tied 1 and 2
    assert runs.pick_best(candidates, "val_accuracy", "min")[0] == "c3"
    with pytest.raises(CheckpointError, match="val_auc"):
        runs.pick_best(candidates, "val_auc", "max")


def test_checkpoints_after_the_last_epoch_the_sweep_saw_are_not_candidates(tmp_path):
    # A trial that ASHA stopped at epoch 2 wrote epoch 3's checkpoint before the stop reached it.
    metrics = {1: {"val_accuracy": 0.7}, 2: {"val_accuracy": 0.8}, 3: {"val_accuracy": 0.9}}
    run = fake_run(tmp_path, metrics, kept=(1, 2, 3))
    assert runs.best_kept_checkpoint(str(run), "val_accuracy", "max")[1]["epoch"] == 3
    assert runs.best_kept_checkpoint(str(run), "val_accuracy", "max", last_epoch=2)[1]["epoch"] == 2
    with pytest.raises(CheckpointError, match="up to epoch 0"):
        runs.best_kept_checkpoint(str(run), "val_accuracy", "max", last_epoch=0)


def test_best_json_is_written_only_for_a_checkpoint_that_exists_and_describes_it(tmp_path):
    metrics = {1: {"val_accuracy": 0.7, "val_loss": 0.5}}
    run = fake_run(tmp_path, metrics, kept=(1,))
    location, _ = runs.best_kept_checkpoint(str(run), "val_loss", "min")
    best = runs.write_best(str(run), "sweep", location, params={"lr": 0.01}, trial_id="t1")
    assert runs.read_best(str(run / runs.BEST_FILE)) == best
    assert best["metrics"] == metrics[1] and best["params"] == {"lr": 0.01} and best["kind"] == "sweep"
    with pytest.raises(CheckpointError):
        runs.write_best(str(run), "train", str(run / "checkpoint_deleted"))
    assert json.loads((run / runs.BEST_FILE).read_text())["checkpoint"] == location  # the old pointer stands
    (run / "bad.json").write_text('{"checkpoint": 3}')
    with pytest.raises(CheckpointError, match="checkpoint"):
        runs.read_best(str(run / "bad.json"))


def test_layout():
    assert runs.run_dir("s3://b/p", "n") == "s3://b/p/n"


def test_the_searched_parameter_table_drives_space_values_and_columns():
    config = load_config(named_config_path("tiny"), ["tune.batch_size=[8, 16]"])
    assert search.space(config) == {"lr": ("loguniform", (0.0003, 0.01)), "unfreeze_depth": ("choice", [1, 5]),
                                    "batch_size": ("choice", [8, 16])}
    values = search.apply_params(config.to_dict(), {"lr": 0.02, "unfreeze_depth": 3, "batch_size": 8})
    assert (values["train"]["lr"], values["model"]["unfreeze_depth"], values["train"]["batch_size"]) == (0.02, 3, 8)
    assert search.params_of({"config/lr": 0.1, "config/unfreeze_depth": 2, "other": 1}) == {"lr": 0.1,
                                                                                           "unfreeze_depth": 2}
    assert search.describe({"lr": 0.000123, "unfreeze_depth": 2}) == "lr 0.000123, unfreeze_depth 2"
    with pytest.raises(KeyError):
        search.apply_params({}, {"momentum": 0.9})


def test_orphaned_placement_groups_are_those_of_dead_jobs_only():
    from genderid.ray_cleanup import orphaned_placement_groups

    class Status:  # the State API hands out an enum
        def __init__(self, value):
            self.value = value

    jobs = [{"job_id": "01", "status": Status("RUNNING")}, {"job_id": "02", "status": Status("SUCCEEDED")},
            {"job_id": "03", "status": "FAILED"}]
    groups = [
        {"placement_group_id": "live", "creator_job_id": "01", "state": "CREATED", "is_detached": False},
        {"placement_group_id": "orphan", "creator_job_id": "02", "state": "CREATED", "is_detached": False},
        {"placement_group_id": "pending-orphan", "creator_job_id": "03", "state": "PENDING", "is_detached": False},
        {"placement_group_id": "removed", "creator_job_id": "02", "state": "REMOVED", "is_detached": False},
        {"placement_group_id": "detached", "creator_job_id": "02", "state": "CREATED", "is_detached": True},
        {"placement_group_id": "unknown-job", "creator_job_id": "09", "state": "CREATED", "is_detached": False},
    ]
    assert orphaned_placement_groups(groups, jobs) == ["orphan", "pending-orphan"]


def test_the_run_actors_waited_for_are_those_of_dead_jobs_only():
    from genderid.ray_cleanup import actors_of_dead_jobs

    jobs = [{"job_id": "01", "status": "RUNNING"}, {"job_id": "02", "status": "SUCCEEDED"},
            {"job_id": "03", "status": "FAILED"}]

    def actor(actor_id, class_name="RayTrainWorker", job_id="02", state="ALIVE", is_detached=False):
        return {"actor_id": actor_id, "class_name": class_name, "job_id": job_id, "state": state,
                "is_detached": is_detached}

    actors = [actor("worker"), actor("controller", "TrainController", "03"), actor("trial", "ImplicitFunc"),
              actor("live", job_id="01"), actor("dead", state="DEAD"), actor("detached", is_detached=True),
              actor("replica", "ServeReplica:app:GenderClassifier"), actor("unknown-job", job_id="09")]
    assert actors_of_dead_jobs(actors, jobs) == ["worker", "controller", "trial"]


def test_a_local_storage_path_is_refused_on_nodes_of_several_hosts():
    pytest.importorskip("ray")
    from genderid.train_ray import check_shared_storage

    check_shared_storage("runs", {"127.0.0.1"})  # one host: its disk is shared by all its nodes
    check_shared_storage("s3://bucket/runs", {"10.0.0.1", "10.0.0.2"})
    check_shared_storage("/mnt/shared/runs", {"10.0.0.1", "10.0.0.2"}, filesystem_type="nfs4")
    check_shared_storage("/mnt/fuse/runs", {"10.0.0.1", "10.0.0.2"}, filesystem_type="fuse.s3fs")
    with pytest.raises(ConfigError, match=r"storage.path: runs is a local ext4 path.*2 hosts.*s3://"):
        check_shared_storage("runs", {"10.0.0.1", "10.0.0.2"}, filesystem_type="ext4")


def test_a_checkpoint_rebuilds_from_its_model_config_and_refuses_a_bad_description(tmp_path):
    from genderid.checkpoint import load_checkpoint

    model = GenderNet(width=0.1, batch_norm=True, unfreeze_depth=3, head_hidden=16).eval()
    directory = save_checkpoint(tmp_path / "c", model, preprocessing=Preprocessing(image_size=(32, 32)))
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["model"] == {"weights": "none", "unfreeze_depth": 3, "width": 0.1, "batch_norm": True,
                             "head_hidden": 16, "dropout": 0.0}
    loaded = load_checkpoint(str(directory))
    assert loaded.model.config == model.config
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.model(x), model(x))
    for bad, message in (({"width": 0.1, "depth_of_field": 2}, "depth_of_field: unknown key"),
                         ({"width": 7}, "model.width")):
        meta["model"] = bad
        (directory / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(str(directory))


def _storage_with_runs(root):
    """A storage path holding: a finished train run, an unfinished one, an unfinished sweep, a finished sweep inside
    a demo-style workdir, and folders that are no run."""
    import time

    torch.manual_seed(0)
    model = GenderNet(width=0.1, head_hidden=8)
    done = root / "finished-run"
    checkpoint = save_checkpoint(done / "checkpoint_000", model, preprocessing=Preprocessing(image_size=(32, 32)),
                                 metrics={"val_accuracy": 0.91, "val_loss": 0.3}, epoch=2)
    runs.write_best(str(done), "train", str(checkpoint))
    time.sleep(0.05)
    (root / "stopped-run").mkdir()
    (root / "stopped-run" / runs.HISTORY_FILE).write_text("[]")
    (root / "stopped-sweep" / runs.TUNE_DIR).mkdir(parents=True)
    (root / "stopped-sweep" / runs.SWEEP_CONFIG_FILE).write_text("{}")
    sweep = root / "demo" / "sweep"
    sweep.mkdir(parents=True)
    time.sleep(0.05)
    runs.write_best(str(sweep), "sweep", str(checkpoint), params={"lr": 0.01}, trial_id="t1")
    (root / "demo" / "samples").mkdir()
    (root / "demo" / "samples" / "1.jpg").write_bytes(b"x")
    (root / "notes.txt").write_text("not a run")
    return str(checkpoint)


def test_runs_lists_runs_and_sweeps_newest_first_with_their_best_checkpoint(tmp_path):
    checkpoint = _storage_with_runs(tmp_path)
    rows = {row["name"]: row for row in runs.list_runs(str(tmp_path))}
    assert set(rows) == {"finished-run", "stopped-run", "stopped-sweep", "demo/sweep"}
    assert rows["finished-run"] | {"when": None} == {
        "name": "finished-run", "location": str(tmp_path / "finished-run"), "kind": "train", "when": None,
        "val_accuracy": 0.91, "val_loss": 0.3, "checkpoint": checkpoint, "finished": True}
    assert rows["demo/sweep"]["kind"] == "sweep" and rows["demo/sweep"]["finished"]
    assert (rows["stopped-run"]["kind"], rows["stopped-run"]["finished"]) == ("train", False)
    assert (rows["stopped-sweep"]["kind"], rows["stopped-sweep"]["finished"]) == ("sweep", False)
    assert [r["name"] for r in runs.list_runs(str(tmp_path))][0] == "demo/sweep"  # newest first
    assert runs.list_runs(str(tmp_path / "nothing-here")) == []


def test_runs_reads_an_s3_storage_path_and_the_cli_prints_it(s3_server, tmp_path):
    import subprocess
    import sys

    from conftest import upload_folder

    checkpoint = _storage_with_runs(tmp_path / "local")
    uri = upload_folder(tmp_path / "local", f"s3://{s3_server['bucket']}/runs-listing")
    rows = runs.list_runs(uri)
    assert {r["name"] for r in rows} == {"finished-run", "stopped-run", "stopped-sweep", "demo/sweep"}
    assert all(r["when"] for r in rows if r["finished"])
    run = subprocess.run([sys.executable, "-m", "genderid", "runs", str(tmp_path / "local")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "when"] and len(lines) == 5
    assert any(line.startswith("finished-run") and checkpoint in line for line in lines)
    listed = subprocess.run([sys.executable, "-m", "genderid", "runs", str(tmp_path / "local"), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert {r["name"] for r in json.loads(listed.stdout)} == {r["name"] for r in rows}
