"""`genderid demo` end to end, with small settings, on the shared cluster."""
import json

import pytest

from conftest import free_port
from genderid.cli import main

pytestmark = pytest.mark.ray


def test_demo_runs_end_to_end_and_predicts_over_http(ray_cluster, tmp_path, capsys):
    workdir, port = tmp_path / "demo", free_port()
    code = main(["demo", "--workdir", str(workdir), "--n", "300", "--port", str(port), "tune.num_samples=2",
                 "tune.max_epochs=2", "tune.unfreeze_depth=[5]", "train.epochs=3"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["endpoint"] == f"http://127.0.0.1:{port}"
    assert summary["test_metrics"]["split"] == "test" and summary["test_metrics"]["accuracy"] > 0.6
    assert len(summary["predictions"]) == 4
    for prediction in summary["predictions"]:  # answered by the endpoint: it carries the served model's version
        assert prediction["label"] in ("male", "female") and len(prediction["model_version"]) == 12
    assert (workdir / "sweep" / "results.csv").is_file() and (workdir / "report" / "report.json").is_file()
    assert json.loads((workdir / "train" / "best.json").read_text())["checkpoint"] == \
        summary["outputs"]["best_checkpoint"]
    for text in ("step 3/7: Tune sweep", "trial_id | config/lr", "step 4/7: train", "[demo] summary",
                 "shut down cleanly"):
        assert text in out, text
    from ray import serve

    assert "genderid" not in serve.status().applications  # Serve was stopped: the demo started it
