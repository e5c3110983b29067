"""MLflow tracking's store, runs and params, without Ray (genderid.tracking)."""
import json
import os

import pytest

from genderid import tracking
from genderid.config import ConfigError, load_config, named_config_path


def tiny(tmp_path, *overrides):
    return load_config(named_config_path("tiny"), [f"storage.path={tmp_path / 'runs'}", *overrides])


def test_the_local_store_lives_under_storage_path_and_nothing_is_written_to_the_working_folder(tmp_path,
                                                                                                monkeypatch):
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    config = tiny(tmp_path)
    tracker = tracking.open_tracker(config)
    assert tracker.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    run = tracking.start_run(tracker, "/runs/a", "train", "a", tracking.flat_params(config.to_dict()))
    tracking.log_folder(tracker, run, str(_report(tmp_path)), "report")
    tracking.finish_run(tracker, run)
    assert os.listdir(work) == []  # MLflow's default artifact root would be ./mlartifacts
    artifacts = tmp_path / "runs" / "mlartifacts"
    assert [p.name for p in artifacts.rglob("report.json")] == ["report.json"]
    assert tracking.ui_command(config) == f"mlflow ui --backend-store-uri {tracker.uri}"


def _report(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.json").write_text("{}")
    return folder


def _epoch(epoch, val_accuracy, start_epoch=1):
    return {"epoch": epoch, "start_epoch": start_epoch, "val_accuracy": val_accuracy, "val_loss": 1 - val_accuracy}


def _curve(client, run_id):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy")]


def test_a_resumed_run_logs_into_the_mlflow_run_it_started_each_epoch_once(tmp_path):
    config = tiny(tmp_path)
    tracker = tracking.open_tracker(config)
    client = tracker.client()
    history = tmp_path / "history.json"
    first = tracking.start_run(tracker, "/runs/sweep", "trial", "t1", {}, trial_id="t1")
    tracking.log_epoch(tracker, first, {**_epoch(1, 0.5), "train_images": 10}, history=str(history))
    tracking.finish_run(tracker, first, failed=True)
    # Killed during epoch 2: its worker still wrote epoch 2 to history.json, but Ray never registered its checkpoint.
    history.write_text(json.dumps([_epoch(1, 0.5), _epoch(2, 0.625)]))
    again = tracking.start_run(tracker, "/runs/sweep", "trial", "t1", {}, trial_id="t1")
    other = tracking.start_run(tracker, "/runs/sweep", "trial", "t2", {}, trial_id="t2")
    assert again == first and other != first
    # The resumed run restores epoch 1, trains epoch 2 again and rewrites history.json before reporting it.
    history.write_text(json.dumps([_epoch(1, 0.5), _epoch(2, 0.75, start_epoch=2)]))
    tracking.log_epoch(tracker, again, _epoch(2, 0.75, start_epoch=2), history=str(history))
    assert _curve(client, first) == [(1, 0.5), (2, 0.75)]  # not the lost run's 0.625 as well
    assert _curve(client, other) == []  # a new run is not backfilled from another
    assert "train_images" not in client.get_run(first).data.metrics  # bookkeeping is not a curve
    assert client.get_run(first).info.status == "RUNNING"


def test_epochs_whose_report_was_lost_after_their_checkpoint_are_backfilled(tmp_path):
    tracker = tracking.open_tracker(tiny(tmp_path))
    client = tracker.client()
    history = tmp_path / "history.json"
    # Epoch 2's checkpoint was registered, its report lost with the driver: the resumed run starts at epoch 3.
    run = tracking.start_run(tracker, "/runs/a", "train", "a", {})
    tracking.log_epoch(tracker, run, _epoch(1, 0.5), history=str(history))
    history.write_text(json.dumps([_epoch(1, 0.5), _epoch(2, 0.625), _epoch(3, 0.75, start_epoch=3)]))
    tracking.log_epoch(tracker, run, _epoch(3, 0.75, start_epoch=3), history=str(history))
    tracking.log_epoch(tracker, run, _epoch(4, 0.8, start_epoch=3), history=str(history))
    assert _curve(client, run) == [(1, 0.5), (2, 0.625), (3, 0.75), (4, 0.8)]
    # A resumed run with no epoch left to run reports none: at its successful end its history is final.
    done = tracking.start_run(tracker, "/runs/b", "train", "b", {})
    tracking.log_epoch(tracker, done, _epoch(1, 0.5), history=str(history))
    tracking.backfill(tracker, done, str(history))
    assert _curve(client, done) == [(1, 0.5), (2, 0.625), (3, 0.75)]


def test_params_are_the_dotted_config_keys(tmp_path):
    config = tiny(tmp_path, "train.lr=0.002")
    params = tracking.flat_params(config.to_dict())
    assert params["train.lr"] == "0.002" and params["data.image_size"] == "[32, 32]"
    assert params["tracking.experiment"] == "genderid"
    tracker = tracking.open_tracker(config)
    run = tracking.start_run(tracker, "/runs/x", "train", "x", params)
    assert tracker.client().get_run(run).data.params["model.unfreeze_depth"] == "5"


def test_tracking_is_off_when_disabled_or_without_a_local_store(tmp_path, capsys):
    assert tracking.open_tracker(tiny(tmp_path, "tracking.enabled=false")) is None
    remote = load_config(named_config_path("tiny"), ["storage.path=s3://bucket/runs"])
    assert tracking.open_tracker(remote) is None
    assert "tracking.uri is not set" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="tracking.uri"):
        tiny(tmp_path, "tracking.uri=nowhere")
    with pytest.raises(tracking.TrackingError, match="tracking.uri: cannot open MLflow store"):
        tracking.open_tracker(tiny(tmp_path, "tracking.uri=nosuchscheme://x"))


def test_a_sweeps_trial_runs_are_found_in_one_paged_search(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    tracker = tracking.open_tracker(tiny(tmp_path))
    ids = {t: tracking.start_run(tracker, "/runs/sweep", "trial", t, {}, trial_id=t) for t in ("t1", "t2", "t3")}
    tracking.start_run(tracker, "/runs/sweep", "sweep", "sweep", {})  # the sweep's own run: not a trial
    tracking.start_run(tracker, "/runs/other", "trial", "t1", {}, trial_id="t1")  # another sweep's trial
    searches = []
    search = MlflowClient.search_runs
    monkeypatch.setattr(MlflowClient, "search_runs", lambda self, *a, **k: searches.append(k) or search(self, *a, **k))
    assert tracking.trial_runs(tracker, "/runs/sweep") == ids
    assert len(searches) == 1
    # Pages of one run: the same answer, every page read (one more search answers the empty last page, or none).
    assert tracking.trial_runs(tracker, "/runs/sweep", page_size=1) == ids
    assert len(searches) >= 4
    assert {t: tracking.find_run(tracker, "/runs/sweep", "trial", t) for t in ids} == ids
