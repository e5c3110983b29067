"""The `genderid` commands that need no Ray: synth, predict --checkpoint, and how input errors are reported."""
import json
import os
import subprocess
import sys

import pytest
import torch

from genderid.checkpoint import save_checkpoint
from conftest import REPO
from genderid.cli import main
from genderid.model import GenderNet
from genderid.predictor import Predictor
from genderid.preprocess import Preprocessing


def test_synth_writes_the_celeba_layout(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "celeba"), "--n", "20", "--size", "40x48"]) == 0
    assert len(list((tmp_path / "celeba" / "img_align_celeba").glob("*.jpg"))) == 20
    assert (tmp_path / "celeba" / "list_attr_celeba.txt").is_file() and "wrote 20" in capsys.readouterr().out


def test_predict_with_a_checkpoint_prints_one_json_line_per_image(tmp_path):
    main(["synth", str(tmp_path / "celeba"), "--n", "4", "--size", "40x48"])
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "ckpt", GenderNet(width=0.0625, batch_norm=True).eval(),
                                 preprocessing=Preprocessing(image_size=(32, 32)))
    images = sorted(str(p) for p in (tmp_path / "celeba" / "img_align_celeba").glob("*.jpg"))[:2]
    run = subprocess.run([sys.executable, "-m", "genderid", "predict", *images, "--checkpoint", str(checkpoint)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
    expected = Predictor.from_checkpoint(str(checkpoint)).predict([open(p, "rb").read() for p in images])
    assert [line["image"] for line in lines] == images
    assert [line["label"] for line in lines] == [p.label for p in expected]


def test_predict_needs_a_checkpoint_or_a_url(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "face.jpg"])
    assert "--checkpoint" in capsys.readouterr().err


def test_input_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "x.jpg"), "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genderid predict: error:") and "nowhere" in err and "Traceback" not in err
    assert main(["predict", "x.jpg", "--url", "http://127.0.0.1:9"]) == 2  # unreadable image: no such file


def test_every_command_refuses_bad_input_with_one_line_and_exit_2(tmp_path, synthetic_celeba):
    """Each command, given bad input, exits 2 with one `genderid <command>: error:` line naming the problem,
    before any Ray cluster starts."""
    no_test_rows = tmp_path / "no-test"
    no_test_rows.mkdir()
    counts = {s: {"male": 1, "female": 1, "total": 2} for s in ("train", "val")}
    (no_test_rows / "_manifest.json").write_text(json.dumps({
        "format": "genderid-parquet", "format_version": 1, "files": [], "rows": 4,
        "counts": {**counts, "test": {"male": 0, "female": 0, "total": 0}}}))
    tiny = "jobs/configs/tiny.yaml"
    cases = [
        ("synth", ["synth", str(tmp_path / "s"), "--n", "0"], "--n: must be >= 1"),
        ("prepare", ["prepare", "--celeba", str(synthetic_celeba), "--out", str(tmp_path / "p"), "--split",
                     "balanced", "--per-class", "100000"], "balanced split: needs 100000"),
        ("train", ["train", "--config", tiny], "data.source: set it"),
        ("tune", ["tune", "--config", tiny, f"data.source={tmp_path / 'nowhere'}"], "not a prepared data set"),
        ("tune", ["tune", "--config", tiny, "tune.max_concurrent_trials=-1"], "tune.max_concurrent_trials: must be"),
        ("evaluate", ["evaluate", "--checkpoint", str(tmp_path / "c"), "--data", str(no_test_rows), "--out",
                      str(tmp_path / "r")], "the test split has no rows"),
        ("predict", ["predict", str(tmp_path / "x.jpg"), "--checkpoint", str(tmp_path / "nowhere")], "nowhere"),
        ("demo", ["demo", "--workdir", str(tmp_path / "d"), "train.lr=-1"], "train.lr: must be a positive"),
    ]
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}  # a Ray that is not there: reaching Ray would hang or fail
    for command, args, expected in cases:
        run = subprocess.run([sys.executable, "-m", "genderid", *args], capture_output=True, text=True, timeout=120,
                             env=env, cwd=REPO)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2, (command, run.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"genderid {command}: error:"), (command, run.stderr)
        assert expected in lines[0], (command, lines[0])
