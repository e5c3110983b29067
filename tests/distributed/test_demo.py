"""The quick start's `./run demo`, end to end with small settings, joined to the shared cluster."""
import json
import subprocess

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.ray


def test_run_demo_end_to_end_predicts_over_http_and_shuts_serve_down(local_cluster, ray_cluster, tmp_path):
    workdir, port = tmp_path / "demo", free_port()
    # RAY_ADDRESS: the demo joins the session's cluster instead of starting a second one on this host.
    env = {**local_cluster.env(), "RAY_ADDRESS": local_cluster.address, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([str(REPO / "run"), "demo", "--workdir", str(workdir), "--n", "300", "--port", str(port),
                          "tune.num_samples=2", "tune.max_epochs=1", "tune.unfreeze_depth=[5]", "train.epochs=3"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["endpoint"] == f"http://127.0.0.1:{port}"
    assert summary["test_metrics"]["split"] == "test" and summary["test_metrics"]["accuracy"] > 0.6
    assert len(summary["predictions"]) == 4
    for prediction in summary["predictions"]:  # answered by the endpoint: it carries the served model's version
        assert prediction["label"] in ("male", "female") and len(prediction["model_version"]) == 12
    assert (workdir / "sweep" / "results.csv").is_file() and (workdir / "report" / "report.json").is_file()
    card = (workdir / "report" / "MODEL_CARD.md").read_text()  # the demo leaves a model card behind
    assert "## Calibration" in card and "## Limits" in card
    for prediction in summary["predictions"]:
        assert isinstance(prediction["uncertain"], bool)
    assert json.loads((workdir / "train" / "best.json").read_text())["checkpoint"] == \
        summary["outputs"]["best_checkpoint"]
    for text in ("step 3/7: Tune sweep", "trial_id | config/lr", "step 4/7: train", "[demo] summary",
                 f"try it in a browser: http://127.0.0.1:{port}/", "model card:", "shut down cleanly"):
        assert text in run.stdout, text
    from ray import serve

    assert "genderid" not in serve.status().applications  # the demo started Serve, so it stopped it
