"""`genderid demo` end to end, with small settings."""
import json

import pytest

from genderid.cli import main

pytestmark = pytest.mark.ray


def test_demo_runs_end_to_end(ray_cluster, tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--n", "300"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.6  # clearly above chance after 4 short epochs
    assert len(summary["predictions"]) == 4 and all(p["label"] in ("male", "female") for p in summary["predictions"])
    assert (tmp_path / "demo" / "checkpoint" / "meta.json").is_file()
    assert "[demo] done" in capsys.readouterr().out
